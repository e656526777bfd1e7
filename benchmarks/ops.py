"""Bandwidth of the random-LTD token ops per backend, beside ``clone`` measured in the same run.

    python benchmarks/ops.py [--device cpu|cuda] [--quick] [--out benchmarks/results/ops_<device>.json]

For each activation shape ``[s, b, h]`` (seq-first, Megatron's layout) and kept length ``k`` it times

* gather ``[s,b,h] -> [k,b,h]``: our extension (``torch.ops.random_ltd.gather_tokens``), the torch reference
  (``random_ltd/ops/reference.py``), ``torch.index_select`` over flattened rows, DeepSpeed's ``token_gather``;
* scatter (out of place): our extension, the reference (clone + ``scatter_``), ``clone`` + ``index_copy_``,
  DeepSpeed's ``clone`` + ``token_scatter_`` (how its ScatterTokens calls it);
* ``clone`` of the op's output-size tensor, the copy-bandwidth ceiling;
* the sampler: ours (``sample_sorted_indices_``), the reference, DeepSpeed's ``torch.multinomial`` + ``token_sort_``.

GB/s counts the bytes an op must move at least: gather reads and writes ``k*b*h`` elements, scatter reads ``s*b*h``
(kept rows from y, the rest from x) and writes ``s*b*h``; every backend is credited with the same bytes, so GB/s
compare like time. DeepSpeed's kernels are GPU-only and used only when ``deepspeed`` imports and its RandomLTD op
builds; they take int32 indices and cannot sort sequences longer than ~2050 tokens (skipped there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from random_ltd.ops import _extension  # noqa: E402
from random_ltd.ops import reference as ref  # noqa: E402


@dataclass
class Row:
    """One measurement."""

    op: str
    shape: list[int]
    keep: int
    backend: str
    time_us: float
    median_us: float
    gbps: float | None
    vs_clone: float | None


def device_name(device: str) -> str:
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


@dataclass
class Timing:
    """Fastest and median of the per-call times of several interleaved blocks."""

    best: float
    median: float


def measure_group(fns: dict[str, Callable[[], object]], block_time: float, rounds: int) -> dict[str, Timing]:
    """Per-call seconds of each function, measured in interleaved blocks (round-robin over the functions).

    Interleaving spreads interference from other processes over all backends alike; the fastest block is the least
    disturbed estimate (timeit's advice), the median is kept beside it. torch's Timer synchronises CUDA around
    each block.
    """
    timers, numbers = {}, {}
    for name, fn in fns.items():
        for _ in range(3):  # warm-up: allocator, caches, lazy CUDA init
            fn()
        timers[name] = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        once = timers[name].timeit(1).median
        numbers[name] = max(1, int(block_time / max(once, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name in fns:
            samples[name].append(timers[name].timeit(numbers[name]).median)
    return {name: Timing(min(v), statistics.median(v)) for name, v in samples.items()}


def load_deepspeed(device: str):
    """DeepSpeed's RandomLTD extension module, or None (with the reason printed)."""
    if device != "cuda":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from deepspeed.ops.op_builder import RandomLTDBuilder

            return RandomLTDBuilder().load()
    except Exception as exc:  # any import or build failure: benchmark without it
        print(f"DeepSpeed random_ltd kernels unavailable: {type(exc).__name__}: {exc}".splitlines()[0])
        return None


def bench_tokens(shape: tuple[int, int, int], keep: int, dtype: torch.dtype, device: str, ds, block_time: float,
                 rounds: int, ours: bool) -> list[Row]:
    s, b, h = shape
    x = torch.randn(shape, device=device).to(dtype)
    out_idx = torch.empty(1, b, keep, dtype=torch.long, device=device)
    if ours:
        torch.ops.random_ltd.sample_sorted_indices_(out_idx, s, 1, 0, 0, 0)
    else:
        out_idx.copy_(ref.sample_sorted_indices(1, b, s, keep, seed=1, device=device))
    idx = out_idx[0]
    flat_rows = (idx.t() * b + torch.arange(b, device=device)).reshape(-1)  # row ids of [s*b, h], precomputed
    y = torch.randn(keep, b, h, device=device).to(dtype)
    esz = x.element_size()
    gather_bytes = 2 * keep * b * h * esz
    scatter_bytes = 2 * s * b * h * esz

    gather: dict[str, Callable[[], object]] = {
        "clone": lambda: y.clone(),
        "torch(reference)": lambda: ref.gather_tokens(x, idx, False),
        "index_select": lambda: x.view(s * b, h).index_select(0, flat_rows).view(keep, b, h),
    }
    scatter: dict[str, Callable[[], object]] = {
        "clone": lambda: x.clone(),
        "torch(reference)": lambda: ref.scatter_tokens(x, y, idx, False),
        "index_copy_": lambda: x.clone().view(s * b, h).index_copy_(0, flat_rows, y.view(keep * b, h)),
    }
    if ours:
        gather["random_ltd"] = lambda: torch.ops.random_ltd.gather_tokens(x, idx, False)
        scatter["random_ltd"] = lambda: torch.ops.random_ltd.scatter_tokens(x, y, idx, False)
    if ds is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        idx32 = idx.to(torch.int32).contiguous()
        # DeepSpeed reinterprets every non-fp32 dtype as fp16: bf16 goes through an fp16 view (same bytes moved).
        xv, yv = (x, y) if x.dtype == torch.float32 else (x.view(torch.float16), y.view(torch.float16))
        gather["deepspeed"] = lambda: ds.token_gather(xv, idx32, False)
        scatter["deepspeed"] = lambda: ds.token_scatter_(xv.clone(), yv, idx32, False)

    rows = []
    for op, fns, nbytes in (("gather", gather, gather_bytes), ("scatter", scatter, scatter_bytes)):
        timings = measure_group(fns, block_time, rounds)
        clone_t = timings["clone"].best
        for name, t in timings.items():
            rows.append(Row(op, list(shape), keep, name, t.best * 1e6, t.median * 1e6, nbytes / t.best / 1e9,
                            clone_t / t.best))
    return rows


def bench_sampler(layers: int, b: int, s: int, keep: int, device: str, ds, block_time: float, rounds: int,
                  ours: bool) -> list[Row]:
    out = torch.empty(layers, b, keep, dtype=torch.long, device=device)
    fns: dict[str, Callable[[], object]] = {
        "torch(reference)": lambda: ref.sample_sorted_indices(layers, b, s, keep, seed=3, step=1, device=device),
    }
    if ours:
        fns["random_ltd"] = lambda: torch.ops.random_ltd.sample_sorted_indices_(out, s, 3, 1, 0, 0)
    if ds is not None and s <= 2048:  # token_sort_'s shared bitmap overflows beyond ~2050 positions
        ones = torch.ones(layers * b, s, device=device)

        def deepspeed_sample() -> torch.Tensor:
            idx = torch.multinomial(ones, keep).reshape(layers, b, keep).to(torch.int32)
            return ds.token_sort_(idx, s)

        fns["deepspeed"] = deepspeed_sample
    timings = measure_group(fns, block_time, rounds)
    return [Row("sample", [layers, b, s], keep, name, t.best * 1e6, t.median * 1e6, None, None)
            for name, t in timings.items()]


# glibc serves allocations above 32 MiB with fresh mmap()s and unmaps them on free, so on CPU every large output
# would be page-faulted in (kernel page zeroing dominating both our ops and clone). These keep freed memory in the
# heap, so the CPU numbers measure the copies. They must be set before the process starts: main() re-executes itself.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_TOP_PAD_": str(2**28)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and shorter timing (smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/ops_<device>.json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for CPU runs (default: torch's); 1 gives stable numbers on a "
                             "shared, oversubscribed machine where OpenMP barriers wait on descheduled threads")
    parser.add_argument("--page-faults", action="store_true",
                        help="CPU: keep glibc's default allocator behaviour (large outputs page-faulted every call)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cpu" and not args.page_faults and argv is None and any(os.environ.get(k) != v
                                                                         for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    out_path = args.out or ROOT / "benchmarks" / "results" / f"ops_{device}.json"

    status = _extension.load()
    ours = status.loaded and (device == "cpu" or status.has_cuda)
    if not ours:
        print(f"random_ltd extension unavailable on {device}: {status.reason}")
    ds = load_deepspeed(device)
    block_time, rounds = (0.02, 3) if args.quick else (0.05, 9)

    h_main = 512 if args.quick else 2048
    token_cases = [((2048, 8, h_main), k) for k in (128, 512, 1024, 1920)]
    token_cases.append(((512, 32, 256 if args.quick else 1024), 256))
    token_cases.append(((8192, 1, 1024) if args.quick else (32768, 1, 1024), 1024 if args.quick else 4096))
    sampler_cases = [(22, 8, 2048, 128), (22, 8, 2048, 1024), (22, 1, 32768, 4096)]
    if args.quick:
        sampler_cases = sampler_cases[:2]

    rows: list[Row] = []
    started = time.time()
    for shape, keep in token_cases:
        rows += bench_tokens(shape, keep, torch.bfloat16, device, ds, block_time, rounds, ours)
        print(f"  done {shape} keep {keep}", flush=True)
    for case in sampler_cases:
        rows += bench_sampler(*case, device, ds, block_time, rounds, ours)

    name = device_name(device)
    print(f"\nrandom_ltd token ops on {name} (torch {torch.__version__}, bf16, {time.time() - started:.0f}s)")
    print("time: fastest of the interleaved blocks (median beside it); GB/s and x clone from the fastest")
    print(f"{'op':8} {'shape':>18} {'keep':>5} {'backend':>17} {'time us':>10} {'median':>10} {'GB/s':>8} "
          f"{'x clone':>8}")
    for r in rows:
        gbps = f"{r.gbps:8.1f}" if r.gbps is not None else f"{'':8}"
        ratio = f"{r.vs_clone:8.2f}" if r.vs_clone is not None else f"{'':8}"
        print(f"{r.op:8} {str(r.shape):>18} {r.keep:>5} {r.backend:>17} {r.time_us:10.1f} {r.median_us:10.1f} "
              f"{gbps} {ratio}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "device": name,
        "threads": torch.get_num_threads(),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device_type": device,
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "quick": args.quick,
        "extension": {"loaded": status.loaded, "has_cuda": status.has_cuda, "source": status.source},
        "deepspeed": ds is not None,
        "bytes_note": "gather: 2*k*b*h*esize; scatter: 2*s*b*h*esize (minimum traffic, same for every backend)",
        "timing_note": f"{rounds} interleaved blocks of ~{block_time * 1e3:.0f} ms per function; time_us = fastest "
                       "block, median_us = median block; gbps and vs_clone use the fastest",
        "results": [asdict(r) for r in rows],
    }, indent=1) + "\n")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
