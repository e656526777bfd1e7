"""Backend selection for the token ops, in the manner of xformers' dispatcher.

Each backend says whether it can run on a device and dtype and, if not, why. The public ops pick the first backend
in ``PRIORITY`` that fits, once per ``(device type, dtype)``: the choice is cached (keyed with the value of
``RANDOM_LTD_BACKEND``, read on every call, so changing the variable takes effect at once). ``RANDOM_LTD_BACKEND=
cuda|cpu|torch`` forces one; a forced backend that cannot run raises with its own reasons instead of silently falling
back.

Under ``torch.compile`` the selection is evaluated once at trace time, outside the traced region (it loads the
extension under a lock and reads the environment, neither of which dynamo can trace), and its result is a constant of
the compiled graph: changing ``RANDOM_LTD_BACKEND`` afterwards needs ``torch._dynamo.reset()``.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from random_ltd.ops import reference

__all__ = ["Backend", "TorchBackend", "CpuBackend", "CudaBackend", "PRIORITY", "COPYABLE_DTYPES", "dtype_reasons",
           "select_backend", "resolve_backend", "backend_report"]

BACKEND_ENV = "RANDOM_LTD_BACKEND"


def _optional_dtypes(*names: str) -> tuple[torch.dtype, ...]:
    return tuple(getattr(torch, n) for n in names if isinstance(getattr(torch, n, None), torch.dtype))


#: Every dtype the token ops move. They only copy whole rows, so any dtype with a plain fixed-size representation
#: works bit-exactly through its size; the opaque ``bits*`` and sub-byte ``uint1..7``/``int1..7`` shells and the
#: quantized dtypes are refused. The same set is spelled out in csrc/random_ltd.cpp (``copy_unit_bytes``);
#: tests/ops/test_ops_contract.py checks that both agree.
COPYABLE_DTYPES: frozenset[torch.dtype] = frozenset((
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.complex32, torch.complex64, torch.complex128,
    *_optional_dtypes("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                      "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2"),
))


def dtype_reasons(dtype: torch.dtype | None) -> list[str]:
    """Why no backend can move tensors of ``dtype`` (empty when they can, or when ``dtype`` is None)."""
    if dtype is None or dtype in COPYABLE_DTYPES:
        return []
    return [f"dtype {str(dtype).replace('torch.', '')} is not copied (bits*, sub-byte and quantized dtypes have no "
            "plain fixed-size representation)"]


def _mark_constant_under_compile(fn):
    # torch.compiler.assume_constant_result(fn), without importing torch._dynamo (about 2 s) when random_ltd is
    # imported: dynamo then calls fn at trace time and bakes its result into the graph instead of tracing it.
    fn._dynamo_marked_constant = True
    return fn


class Backend:
    """One implementation of the primitive token ops."""

    NAME: ClassVar[str]
    DEVICE_TYPES: ClassVar[tuple[str, ...]]

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        """Why this backend cannot run on ``device`` for tensors of ``dtype`` (empty when it can)."""
        reasons = []
        if device.type not in self.DEVICE_TYPES:
            reasons.append(f"device type {device.type!r} not in {self.DEVICE_TYPES}")
        return reasons + dtype_reasons(dtype)

    def gather(self, x: torch.Tensor, indices: torch.Tensor, batch_first: bool) -> torch.Tensor:
        raise NotImplementedError

    def scatter(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, batch_first: bool) -> torch.Tensor:
        raise NotImplementedError

    def gather_backward(self, grad: torch.Tensor, indices: torch.Tensor, seq_len: int,
                        batch_first: bool) -> torch.Tensor:
        """Zeros of x's shape with rows ``(b, indices[b, j])`` = ``grad[(b, j)]`` (the gradient of ``gather``)."""
        raise NotImplementedError

    def sample_(self, out: torch.Tensor, seq_len: int, seed: int, step: int, micro_batch: int,
                layer_offset: int) -> torch.Tensor:
        raise NotImplementedError

    def slice_mask(self, mask: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.NAME}>"


class TorchBackend(Backend):
    """The reference implementation (random_ltd/ops/reference.py): any device, every dtype of COPYABLE_DTYPES."""

    NAME = "torch"
    DEVICE_TYPES = ("cpu", "cuda", "meta", "mps", "xpu")

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        return dtype_reasons(dtype)

    def gather(self, x, indices, batch_first):
        return reference.gather_tokens(x, indices, batch_first)

    def scatter(self, x, y, indices, batch_first):
        return reference.scatter_tokens(x, y, indices, batch_first)

    def gather_backward(self, grad, indices, seq_len, batch_first):
        return reference.gather_tokens_backward(grad, indices, seq_len, batch_first)

    def sample_(self, out, seq_len, seed, step, micro_batch, layer_offset):
        num_layers, batch, keep = out.shape
        out.copy_(reference.sample_sorted_indices(num_layers, batch, seq_len, keep, seed=seed, step=step,
                                                  micro_batch=micro_batch, layer_offset=layer_offset,
                                                  device=out.device))
        return out

    def slice_mask(self, mask, indices):
        return reference.slice_attention_mask(mask, indices)


@_mark_constant_under_compile
def _extension_reasons(device_type: str) -> tuple[str, ...]:
    """Why the compiled ops cannot serve ``device_type`` (loads the extension once; empty when they can)."""
    from random_ltd.ops import _extension

    status = _extension.load()
    if not status.loaded:
        return (f"extension not loaded: {status.reason}",)
    if device_type == "cuda" and not status.has_cuda:
        return ("extension was built without CUDA (needs nvcc and a CUDA build of torch)",)
    return ()


class _ExtensionBackend(Backend):
    """Common part of the compiled backends: they call the ops registered by csrc/random_ltd.cpp."""

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        reasons = super().not_supported_reasons(device, dtype)
        if device.type in self.DEVICE_TYPES:
            reasons += list(_extension_reasons(device.type))
        return reasons

    def gather(self, x, indices, batch_first):
        return torch.ops.random_ltd.gather_tokens.default(x.contiguous(), indices.contiguous(), batch_first)

    def scatter(self, x, y, indices, batch_first):
        return torch.ops.random_ltd.scatter_tokens.default(x.contiguous(), y.contiguous(), indices.contiguous(),
                                                           batch_first)

    def gather_backward(self, grad, indices, seq_len, batch_first):
        return torch.ops.random_ltd.gather_tokens_backward.default(grad.contiguous(), indices.contiguous(), seq_len,
                                                                   batch_first)

    def sample_(self, out, seq_len, seed, step, micro_batch, layer_offset):
        torch.ops.random_ltd.sample_sorted_indices_(out, seq_len, seed, step, micro_batch, layer_offset)
        return out

    def slice_mask(self, mask, indices):
        return torch.ops.random_ltd.slice_attention_mask(mask.contiguous(), indices.contiguous())


class CpuBackend(_ExtensionBackend):
    """C++ kernels (csrc/cpu) parallelised with at::parallel_for."""

    NAME = "cpu"
    DEVICE_TYPES = ("cpu",)


class CudaBackend(_ExtensionBackend):
    """CUDA kernels (csrc/cuda): vectorised copies and a fused Philox sampler."""

    NAME = "cuda"
    DEVICE_TYPES = ("cuda",)


PRIORITY: tuple[Backend, ...] = (CudaBackend(), CpuBackend(), TorchBackend())
_BY_NAME = {b.NAME: b for b in PRIORITY}
#: (RANDOM_LTD_BACKEND value, device type, dtype) -> chosen backend name
_SELECTED: dict[tuple[str, str, torch.dtype | None], str] = {}
#: (backend class, device type, dtype) -> reasons a backend passed by the caller cannot run (empty: it can)
_FORCED: dict[tuple[type, str, torch.dtype | None], tuple[str, ...]] = {}


def _choose(forced: str, device: torch.device, dtype: torch.dtype | None) -> Backend:
    if forced:
        if forced not in _BY_NAME:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {sorted(_BY_NAME)}")
        backend = _BY_NAME[forced]
        reasons = backend.not_supported_reasons(device, dtype)
        if reasons:
            raise RuntimeError(f"{BACKEND_ENV}={forced} cannot run on {device.type}: " + "; ".join(reasons))
        return backend
    report = []
    for backend in PRIORITY:
        reasons = backend.not_supported_reasons(device, dtype)
        if not reasons:
            return backend
        report.append(f"{backend.NAME}: {'; '.join(reasons)}")
    raise RuntimeError(f"no token-op backend runs on {device.type} with dtype {dtype}: " + " | ".join(report))


@_mark_constant_under_compile
def _selected_name(device_type: str, dtype: torch.dtype | None) -> str:
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    key = (forced, device_type, dtype)
    name = _SELECTED.get(key)
    if name is None:
        name = _SELECTED[key] = _choose(forced, torch.device(device_type), dtype).NAME
    return name


@_mark_constant_under_compile
def _forced_reasons(backend: Backend, device_type: str, dtype: torch.dtype | None) -> tuple[str, ...]:
    key = (type(backend), device_type, dtype)
    reasons = _FORCED.get(key)
    if reasons is None:
        reasons = _FORCED[key] = tuple(backend.not_supported_reasons(torch.device(device_type), dtype))
    return reasons


def select_backend(device: torch.device | str, dtype: torch.dtype | None = None) -> Backend:
    """The backend used for tensors of ``dtype`` on ``device``; honours ``RANDOM_LTD_BACKEND`` (cached, cheap)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _BY_NAME[_selected_name(device_type, dtype)]


def resolve_backend(backend: Backend | None, device: torch.device, dtype: torch.dtype | None) -> Backend:
    """``backend`` if given and able to run (else a RuntimeError with its reasons), or ``select_backend``'s choice."""
    if backend is None:
        return _BY_NAME[_selected_name(device.type, dtype)]
    reasons = _forced_reasons(backend, device.type, dtype)
    if reasons:
        raise RuntimeError(f"backend {backend.NAME} cannot run on {device.type}: " + "; ".join(reasons))
    return backend


def backend_report(device: torch.device | str, dtype: torch.dtype | None = None) -> list[tuple[str, list[str]]]:
    """``[(name, reasons)]`` for every backend on ``device``; empty reasons means usable."""
    device = torch.device(device)
    return [(b.NAME, b.not_supported_reasons(device, dtype)) for b in PRIORITY]
