"""Backend selection for the token ops, in the manner of xformers' dispatcher.

Each backend says whether it can run on a device and, if not, why. The public ops pick the first backend in
``PRIORITY`` that fits. ``RANDOM_LTD_BACKEND=cuda|cpu|torch`` forces one; a forced backend that cannot run raises
with its own reasons instead of silently falling back.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from random_ltd.ops import reference

__all__ = ["Backend", "TorchBackend", "CpuBackend", "CudaBackend", "PRIORITY", "select_backend", "backend_report"]

BACKEND_ENV = "RANDOM_LTD_BACKEND"


class Backend:
    """One implementation of the four primitive token ops."""

    NAME: ClassVar[str]
    DEVICE_TYPES: ClassVar[tuple[str, ...]]

    def not_supported_reasons(self, device: torch.device) -> list[str]:
        """Why this backend cannot run on ``device`` (empty when it can)."""
        reasons = []
        if device.type not in self.DEVICE_TYPES:
            reasons.append(f"device type {device.type!r} not in {self.DEVICE_TYPES}")
        return reasons

    def gather(self, x: torch.Tensor, indices: torch.Tensor, batch_first: bool) -> torch.Tensor:
        raise NotImplementedError

    def scatter(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, batch_first: bool) -> torch.Tensor:
        raise NotImplementedError

    def sample_(self, out: torch.Tensor, seq_len: int, seed: int, step: int, micro_batch: int,
                layer_offset: int) -> torch.Tensor:
        raise NotImplementedError

    def slice_mask(self, mask: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.NAME}>"


class TorchBackend(Backend):
    """The reference implementation (random_ltd/ops/reference.py): any device, any dtype."""

    NAME = "torch"
    DEVICE_TYPES = ("cpu", "cuda", "meta", "mps", "xpu")

    def not_supported_reasons(self, device: torch.device) -> list[str]:
        return []

    def gather(self, x, indices, batch_first):
        return reference.gather_tokens(x, indices, batch_first)

    def scatter(self, x, y, indices, batch_first):
        return reference.scatter_tokens(x, y, indices, batch_first)

    def sample_(self, out, seq_len, seed, step, micro_batch, layer_offset):
        num_layers, batch, keep = out.shape
        out.copy_(reference.sample_sorted_indices(num_layers, batch, seq_len, keep, seed=seed, step=step,
                                                  micro_batch=micro_batch, layer_offset=layer_offset,
                                                  device=out.device))
        return out

    def slice_mask(self, mask, indices):
        b, k = indices.shape
        heads, s = mask.shape[1], mask.shape[-1]
        rows = torch.gather(mask.expand(b, heads, s, s), 2, indices.view(b, 1, k, 1).expand(b, heads, k, s))
        return torch.gather(rows, 3, indices.view(b, 1, 1, k).expand(b, heads, k, k))


class _ExtensionBackend(Backend):
    """Common part of the compiled backends: they call the ops registered by csrc/random_ltd.cpp."""

    def not_supported_reasons(self, device: torch.device) -> list[str]:
        from random_ltd.ops import _extension

        reasons = super().not_supported_reasons(device)
        status = _extension.load()
        if not status.loaded:
            reasons.append(f"extension not loaded: {status.reason}")
        elif self.NAME == "cuda" and not status.has_cuda:
            reasons.append("extension was built without CUDA (needs nvcc and a CUDA build of torch)")
        return reasons

    def gather(self, x, indices, batch_first):
        return torch.ops.random_ltd.gather_tokens(x.contiguous(), indices.contiguous(), batch_first)

    def scatter(self, x, y, indices, batch_first):
        return torch.ops.random_ltd.scatter_tokens(x.contiguous(), y.contiguous(), indices.contiguous(), batch_first)

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


def select_backend(device: torch.device | str) -> Backend:
    """The backend used for tensors on ``device``; honours ``RANDOM_LTD_BACKEND``."""
    device = torch.device(device)
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in _BY_NAME:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {sorted(_BY_NAME)}")
        backend = _BY_NAME[forced]
        reasons = backend.not_supported_reasons(device)
        if reasons:
            raise RuntimeError(f"{BACKEND_ENV}={forced} cannot run on {device}: " + "; ".join(reasons))
        return backend
    for backend in PRIORITY:
        if not backend.not_supported_reasons(device):
            return backend
    raise AssertionError("unreachable: the torch backend supports every device")


def backend_report(device: torch.device | str) -> list[tuple[str, list[str]]]:
    """``[(name, reasons)]`` for every backend on ``device``; empty reasons means usable."""
    device = torch.device(device)
    return [(b.NAME, b.not_supported_reasons(device)) for b in PRIORITY]
