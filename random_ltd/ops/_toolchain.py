"""Build facts shared by setup.py and the JIT fallback (``_extension.py``): sources, flags, env switches, nvcc.

Deliberately free of torch and package imports: setup.py loads this file by path before anything is installed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: kernel sources, relative to the repository root
CPU_SOURCES = ("csrc/random_ltd.cpp", "csrc/cpu/token_ops_cpu.cpp")
CUDA_SOURCES = ("csrc/cuda/token_ops_cuda.cu",)
#: -fopenmp: the OpenMP pragmas of at::parallel_for are compiled into our own code; without it it runs serially
CXX_FLAGS = ("-O3", "-fopenmp")
LINK_FLAGS = ("-fopenmp",)


def env_flag(name: str) -> bool:
    """A boolean environment switch (``1``/``true``/``yes``/``on``)."""
    return os.environ.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


def nvcc_found() -> bool:
    """nvcc under ``CUDA_HOME``/``CUDA_PATH`` or on ``PATH``."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return True
    return shutil.which("nvcc") is not None
