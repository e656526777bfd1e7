"""Loading of the compiled ``random_ltd`` ops (csrc/), with a JIT fallback.

``load()`` is called lazily by the backend dispatcher (``random_ltd.ops.dispatch``) and caches its answer:

1. ``import random_ltd._C`` (built by ``pip install --no-build-isolation -e .``), else
2. JIT-compile csrc/ with ``torch.utils.cpp_extension.load`` (CPU sources always; the .cu and ``-DWITH_CUDA`` only
   when torch is a CUDA build and nvcc exists). ``RANDOM_LTD_NO_JIT=1`` disables this step.

If both fail, one warning says the torch backend will be used and how to build; the reason is kept in the status
(``python -m random_ltd.info`` prints it). After a successful load, fake (meta) kernels are registered for the
ops so that ``torch.compile`` and ``torch.library.opcheck`` can trace them. Autograd is not registered here: the
public ops (random_ltd/ops/token_ops.py) compose gather and scatter for their backward.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from random_ltd.ops._toolchain import CPU_SOURCES, CUDA_SOURCES, CXX_FLAGS, LINK_FLAGS
from random_ltd.ops._toolchain import env_flag as _env_flag
from random_ltd.ops._toolchain import nvcc_found as _nvcc_found

__all__ = ["ExtensionStatus", "load", "OPS", "CSRC_DIR"]

OPS = ("gather_tokens", "scatter_tokens", "gather_tokens_backward", "sample_sorted_indices_", "slice_attention_mask")
# Sources are found next to the package (editable installs and source checkouts).
CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the random_ltd checkout"


@dataclass(frozen=True)
class ExtensionStatus:
    """Outcome of ``load()``.

    Attributes:
        loaded: the ``torch.ops.random_ltd.*`` ops are registered.
        has_cuda: they have CUDA kernels (the extension was built with nvcc against a CUDA torch).
        source: ``"prebuilt"`` (``random_ltd._C``), ``"jit"``, or None when nothing loaded.
        reason: why the extension (or its CUDA part) is unavailable; None when fully loaded.
    """

    loaded: bool
    has_cuda: bool
    source: Literal["prebuilt", "jit"] | None
    reason: str | None


_lock = threading.Lock()
_status: ExtensionStatus | None = None


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("random_ltd::gather_tokens", "CUDA")


def _jit_compile() -> None:
    """Compile csrc/ in torch's extension cache and load it as a plain library (no Python module needed)."""
    from torch.utils import cpp_extension

    root = CSRC_DIR.parent
    sources = [root / p for p in CPU_SOURCES]
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {', '.join(missing)}")
    cflags = list(CXX_FLAGS)
    cuda_cflags: list[str] = []
    if torch.version.cuda is not None and _nvcc_found():
        sources += [root / p for p in CUDA_SOURCES]
        cflags.append("-DWITH_CUDA")
        cuda_cflags = ["-O3"]
    cpp_extension.load(
        name="random_ltd_C",
        sources=[str(p) for p in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_cflags,
        extra_ldflags=list(LINK_FLAGS),
        is_python_module=False,
        verbose=_env_flag("RANDOM_LTD_JIT_VERBOSE"),
    )


def _register_fakes() -> None:
    """Shape-only (meta) kernels for tracing; they mirror the output shapes of csrc/random_ltd.cpp."""

    @torch.library.register_fake("random_ltd::gather_tokens")
    def _gather_fake(x: torch.Tensor, indices: torch.Tensor, batch_first: bool) -> torch.Tensor:
        b, k = indices.shape
        return x.new_empty((b, k, x.shape[2]) if batch_first else (k, b, x.shape[2]))

    @torch.library.register_fake("random_ltd::scatter_tokens")
    def _scatter_fake(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, batch_first: bool) -> torch.Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("random_ltd::gather_tokens_backward")
    def _gather_backward_fake(grad: torch.Tensor, indices: torch.Tensor, seq_len: int,
                              batch_first: bool) -> torch.Tensor:
        b = indices.shape[0]
        return grad.new_empty((b, seq_len, grad.shape[2]) if batch_first else (seq_len, b, grad.shape[2]))

    @torch.library.register_fake("random_ltd::sample_sorted_indices_")
    def _sample_fake(out: torch.Tensor, seq_len: int, seed: int, step: int, micro_batch: int,
                     layer_offset: int) -> None:
        return None

    @torch.library.register_fake("random_ltd::slice_attention_mask")
    def _slice_fake(mask: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        b, k = indices.shape
        return mask.new_empty((b, mask.shape[1], k, k))


def _load_uncached() -> ExtensionStatus:
    try:
        import random_ltd._C  # noqa: F401  (loading the library runs its TORCH_LIBRARY registrations)

        source: Literal["prebuilt", "jit"] = "prebuilt"
    except ImportError as exc:
        prebuilt_error = f"random_ltd._C not importable ({exc})"
        if _env_flag("RANDOM_LTD_NO_JIT"):
            return ExtensionStatus(False, False, None, f"{prebuilt_error}; JIT disabled by RANDOM_LTD_NO_JIT=1")
        try:
            _jit_compile()
        except Exception as jit_exc:  # any build failure means: use the torch backend
            first_line = str(jit_exc).strip().splitlines()[0] if str(jit_exc).strip() else type(jit_exc).__name__
            return ExtensionStatus(False, False, None, f"{prebuilt_error}; JIT build failed: {first_line}")
        source = "jit"
    _register_fakes()
    has_cuda = _has_cuda_kernels()
    reason = None if has_cuda else (
        f"built without CUDA kernels (torch.version.cuda={torch.version.cuda}, nvcc found={_nvcc_found()})"
    )
    return ExtensionStatus(True, has_cuda, source, reason)


def load() -> ExtensionStatus:
    """Load the compiled ops once per process and report what is available (thread-safe, cached)."""
    global _status
    with _lock:
        if _status is None:
            _status = _load_uncached()
            if not _status.loaded:
                warnings.warn(
                    f"random_ltd: compiled kernels unavailable, the torch backend will be used ({_status.reason}); "
                    f"{_BUILD_HINT}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _status
