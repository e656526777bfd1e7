"""The few patches that let megatron-core 0.19 train on CPU (gloo), for tests and the default CPU job.

megatron-core has no CPU path: a handful of places ask for ``torch.cuda.current_device()``, build the default
causal mask on ``"cuda"``, or keep "CUDA" RNG states for the tensor-parallel RNG tracker and activation recompute.
``apply_cpu_shim()`` patches exactly those, and only when CUDA is absent (it is a no-op on a GPU machine):

1. ``torch.cuda.current_device`` returns the CPU device, so ``device=torch.cuda.current_device()`` allocations
   (rotary tables, the global memory buffer, sequence-parallel all-gathers) land on the CPU.
2. ``megatron.core.transformer.utils.get_default_causal_mask`` / ``get_sliding_window_causal_mask`` (and their
   imports in ``fusions.fused_softmax``) build their masks on the CPU.
3. The RNG tracker keeps CPU generator states: ``fork(name)`` swaps the CPU default generator, so dropout inside a
   tensor-parallel region draws from that region's stream, as it does on GPU; recompute saves and restores them.

Everything else (layers, specs, parallel state, gloo collectives) is megatron-core's own code.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["apply_cpu_shim", "cpu_shim_applied"]

_APPLIED = False


def cpu_shim_applied() -> bool:
    """Whether ``apply_cpu_shim`` patched this process."""
    return _APPLIED


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


@functools.cache
def _causal_mask_cpu(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sliding_window_mask_cpu(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])


def _get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """``CudaRNGStatesTracker`` whose named states are CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def apply_cpu_shim() -> bool:
    """Patch megatron-core for CPU training when CUDA is absent; returns whether the patches are in place.

    Idempotent. Call it before building a megatron-core model (``random_ltd.integrations.megatron`` does so when
    CUDA is unavailable).
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    torch.cuda.current_device = _cpu_current_device
    for mod in (tutils, fused_softmax):
        mod.get_default_causal_mask = _causal_mask_cpu
        mod.get_sliding_window_causal_mask = _sliding_window_mask_cpu
    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state
    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _APPLIED = True
    return True
