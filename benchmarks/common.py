"""What the benchmarks share: the allocator environment, the device's name, minor page faults and JSON output.

CPU timings of large tensors are only meaningful without steady-state page faults. glibc serves allocations of
32 MiB and more with fresh ``mmap()``s and unmaps them on ``free``, so every such tensor (a [b, heads, s, s] fp32
attention score at s=512, a full activation at [2048, 8, 2048]) is page-faulted in (the kernel zeroes each 4 KiB page)
on every use. ``MALLOC_ENV`` keeps freed memory in the heap instead; glibc reads it once at start-up, so a benchmark
calls ``reexec_with_malloc_env`` first thing, which re-executes the script with it when it is not already set.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

#: glibc tunables read at process start: no mmap()ed chunks, never trim the heap, grow it in 256 MiB steps
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_TOP_PAD_": str(2**28)}


def malloc_env_active() -> bool:
    """Whether this process was started with ``MALLOC_ENV``."""
    return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def reexec_with_malloc_env(extra: dict[str, str] | None = None) -> None:
    """Re-execute this script (same interpreter and arguments) with ``MALLOC_ENV`` (and ``extra``) unless set."""
    want = {**MALLOC_ENV, **(extra or {})}
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **want})


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage``); the difference around a call is its faults."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def transparent_hugepages() -> str | None:
    """The kernel's THP mode (``always``/``madvise``/``never``), or None where it cannot be read."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return next((w[1:-1] for w in text.split() if w.startswith("[")), text.strip())


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model with its core count and torch's thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def environment(device: str) -> dict[str, Any]:
    """Facts recorded beside every result: device, torch, allocator settings, THP, machine load."""
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "transparent_hugepages": transparent_hugepages(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "argv": sys.argv[1:],
    }
    if device == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def write_json(path: Path | str, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
