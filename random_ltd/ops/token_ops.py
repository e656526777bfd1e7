"""Public token ops: validation, backend dispatch and autograd.

Every op validates its arguments before any kernel runs and raises ``ValueError``/``TypeError`` naming the argument
and the expected form. Autograd saves only the indices (never an activation): the backward of a gather is a scatter
into zeros, the backward of a scatter is a gather plus a zero-filled copy, each correct on its own.
"""

from __future__ import annotations

import torch

from random_ltd.ops.dispatch import Backend, select_backend
from random_ltd.seeds import SEED_MAX

__all__ = [
    "sample_sorted_indices",
    "gather_tokens",
    "scatter_tokens",
    "slice_attention_mask",
    "gather_positions",
]

_MAX_SEED = SEED_MAX  # seeds and steps share one range (random_ltd/seeds.py)


def _shape(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def _check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def sample_sorted_indices(
    num_layers: int,
    batch: int,
    seq_len: int,
    keep: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    step: int = 0,
    micro_batch: int = 0,
    layer_offset: int = 0,
) -> torch.Tensor:
    """Draw, per (layer, sample), ``keep`` distinct positions of ``seq_len``, sorted ascending.

    Args:
        num_layers, batch, seq_len, keep: output is int64 ``[num_layers, batch, keep]``, ``1 <= keep <= seq_len``.
        seed: counter-based key. The result is a pure function of ``(seed, step, micro_batch, layer_offset + l, b)``,
            identical on every backend, every tensor-parallel rank and on activation recompute.
        generator: if ``seed`` is None, a seed is drawn from this generator (or torch's default generator).
        device: where the result lives (default CPU).
        step, micro_batch, layer_offset: the rest of the counter; ``layer_offset`` is the global index of layer 0.

    Equivalent PyTorch code (in distribution)::

        torch.stack([torch.stack([torch.randperm(seq_len)[:keep].sort().values for _ in range(batch)])
                     for _ in range(num_layers)])

    Raises:
        TypeError / ValueError: a non-int or out-of-range argument, or both ``seed`` and ``generator`` given.
    """
    _check_int("num_layers", num_layers, 1)
    _check_int("batch", batch, 1)
    _check_int("seq_len", seq_len, 1, 2**31 - 1)
    _check_int("keep", keep, 1)
    if keep > seq_len:
        raise ValueError(f"keep must be <= seq_len ({seq_len}), got {keep}")
    _check_int("step", step, 0, _MAX_SEED)
    _check_int("micro_batch", micro_batch, 0, 2**32 - 1)
    _check_int("layer_offset", layer_offset, 0, 2**32 - num_layers)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is None:
        seed = int(torch.randint(0, _MAX_SEED, (1,), generator=generator).item())
    _check_int("seed", seed, 0, _MAX_SEED)
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.empty((num_layers, batch, keep), dtype=torch.int64, device=device)
    return select_backend(device).sample_(out, seq_len, seed, step, micro_batch, layer_offset)


def _check_tokens(x: torch.Tensor, indices: torch.Tensor, batch_first: bool, check_values: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        layout = "[b, s, h]" if batch_first else "[s, b, h]"
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 3-D tensor {layout}, got {got}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        got = _shape(indices) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a 2-D int64 tensor [b, k], got {got}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if indices.device != x.device:
        raise ValueError(f"indices must be on x's device {x.device}, got {indices.device}")
    b, s = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    if indices.shape[0] != b:
        raise ValueError(f"indices batch {indices.shape[0]} != x batch {b} (x {_shape(x)}, batch_first={batch_first})")
    if indices.shape[1] > s:
        raise ValueError(f"indices keep {indices.shape[1]} > sequence length {s} of x {_shape(x)}")
    if check_values and indices.numel() and bool(((indices < 0) | (indices >= s)).any()):
        raise ValueError(f"indices must lie in [0, {s}); got min {int(indices.min())}, max {int(indices.max())}")


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, indices, batch_first, backend):
        ctx.save_for_backward(indices)
        ctx.x_shape, ctx.batch_first, ctx.backend = x.shape, batch_first, backend
        return backend.gather(x, indices, batch_first)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        zeros = grad.new_zeros(ctx.x_shape)
        return ctx.backend.scatter(zeros, grad, indices, ctx.batch_first), None, None, None


class _ScatterTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, indices, batch_first, backend):
        ctx.save_for_backward(indices)
        ctx.y_shape, ctx.batch_first, ctx.backend = y.shape, batch_first, backend
        return backend.scatter(x, y, indices, batch_first)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        grad_x = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.backend.scatter(grad, grad.new_zeros(ctx.y_shape), indices, ctx.batch_first)
        if ctx.needs_input_grad[1]:
            grad_y = ctx.backend.gather(grad, indices, ctx.batch_first)
        return grad_x, grad_y, None, None, None


def gather_tokens(x: torch.Tensor, indices: torch.Tensor, *, batch_first: bool, check_indices: bool = True,
                  backend: Backend | None = None) -> torch.Tensor:
    """Keep the tokens named by ``indices``: ``[s,b,h] -> [k,b,h]`` or, with ``batch_first``, ``[b,s,h] -> [b,k,h]``.

    Args:
        x: hidden states, any dtype, any device; non-contiguous input is made contiguous for the compiled kernels.
        indices: int64 ``[b, k]`` on ``x``'s device, values in ``[0, s)`` (as from ``sample_sorted_indices``).
        check_indices: verify index values (a device sync on GPU); internal callers that drew the indices
            themselves pass False.
        backend: force a backend (default: ``select_backend(x.device)``).

    Equivalent PyTorch code (``batch_first=True``)::

        torch.gather(x, 1, indices[..., None].expand(-1, -1, x.shape[-1]))

    Differentiable; saves only ``indices``.

    Raises:
        ValueError / TypeError: wrong rank, dtype, device, batch or out-of-range indices.
    """
    _check_tokens(x, indices, batch_first, check_indices)
    return _GatherTokens.apply(x, indices, batch_first, backend or select_backend(x.device))


def scatter_tokens(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, *, batch_first: bool,
                   check_indices: bool = True, backend: Backend | None = None) -> torch.Tensor:
    """Out-of-place combine: a copy of ``x`` whose positions ``indices`` hold the rows of ``y``.

    Args:
        x: full sequence ``[s,b,h]`` (``[b,s,h]`` with ``batch_first``).
        y: kept tokens ``[k,b,h]`` (``[b,k,h]``), same dtype and device as ``x``.
        indices: int64 ``[b, k]``, distinct per row (duplicates make the result order-dependent).

    Equivalent PyTorch code (``batch_first=True``)::

        x.clone().scatter_(1, indices[..., None].expand(-1, -1, x.shape[-1]), y)

    Differentiable in ``x`` and ``y``; saves only ``indices``.

    Raises:
        ValueError / TypeError: as ``gather_tokens``, plus a ``y`` whose shape or dtype does not match.
    """
    _check_tokens(x, indices, batch_first, check_indices)
    if not isinstance(y, torch.Tensor) or y.dim() != 3:
        raise ValueError(f"y must be a 3-D tensor, got {_shape(y) if isinstance(y, torch.Tensor) else type(y)}")
    b, k = indices.shape
    expected = (b, k, x.shape[-1]) if batch_first else (k, b, x.shape[-1])
    if tuple(y.shape) != expected:
        raise ValueError(f"y must have shape {list(expected)} (indices {list(indices.shape)}, x {_shape(x)}), "
                         f"got {_shape(y)}")
    if y.dtype != x.dtype or y.device != x.device:
        raise TypeError(f"y must match x's dtype and device ({x.dtype} on {x.device}), got {_shape(y)}")
    return _ScatterTokens.apply(x, y, indices, batch_first, backend or select_backend(x.device))


def _check_mask_indices(indices: torch.Tensor, device: torch.device) -> None:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.dtype != torch.int64:
        got = _shape(indices) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be an int64 tensor [b, k], got {got}")
    if indices.device != device:
        raise ValueError(f"indices must be on {device}, got {indices.device}")


def _batch_of(name: str, t: torch.Tensor, dim: int, indices: torch.Tensor) -> None:
    if t.shape[dim] not in (1, indices.shape[0]) and indices.shape[0] != 1:
        raise ValueError(f"{name} batch {t.shape[dim]} must be 1 or match indices batch {indices.shape[0]} "
                         f"({name} {_shape(t)}, indices {list(indices.shape)})")


def slice_attention_mask(mask: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor | None:
    """Restrict an attention mask to the kept tokens, slicing query and key axes with the same per-sample indices.

    Accepted forms (bool, where True means masked, or additive float, kept as is):
        - ``None`` -> ``None``
        - ``[b|1, h|1, s, s]`` (Megatron, DeepSpeed, HF 4-D) -> ``[B, h|1, k, k]``
        - ``[b|1, 1, 1, s]`` (HF extended padding mask) -> ``[B, 1, 1, k]``
        - ``[b|1, s]`` (padding mask) -> ``[B, k]``
    where ``B`` is the indices batch (or the mask batch when ``indices`` is batch-shared ``[1, k]``).

    For sorted indices, a sliced causal mask equals a fresh causal ``k x k`` mask; padding and EOD-reset masks are
    sliced correctly on both axes.

    Equivalent PyTorch code (4-D square form)::

        torch.stack([m[i % m.shape[0]][:, idx][:, :, idx] for i, idx in enumerate(indices)])

    Raises:
        ValueError: a mask of another rank or a non-square 4-D mask with more than one query row.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
    _check_mask_indices(indices, mask.device)
    s = mask.shape[-1]
    k = indices.shape[1]
    if k > s:
        raise ValueError(f"indices keep {k} > mask sequence length {s} (mask {_shape(mask)})")
    if mask.dim() == 2:
        _batch_of("mask", mask, 0, indices)
        b = max(mask.shape[0], indices.shape[0])
        return torch.gather(mask.expand(b, s), 1, indices.expand(b, k))
    if mask.dim() != 4:
        raise ValueError(f"mask must be None, [b, s], [b, 1, 1, s] or [b, h, s, s]; got {_shape(mask)}")
    _batch_of("mask", mask, 0, indices)
    b = max(mask.shape[0], indices.shape[0])
    idx = indices.expand(b, k)
    if mask.shape[2] == 1:
        heads = mask.shape[1]
        return torch.gather(mask.expand(b, heads, 1, s), 3, idx.view(b, 1, 1, k).expand(b, heads, 1, k))
    if mask.shape[2] != s:
        raise ValueError(f"4-D mask must be square over the last two axes or have one query row, got {_shape(mask)}")
    # The kernels take a mask batch of 1 (shared) or b, and per-sample indices [b, k].
    return select_backend(mask.device).slice_mask(mask, idx)


def gather_positions(pos, indices: torch.Tensor):
    """Positions of the kept tokens, for every position form a layer receives.

    - position ids ``[b|1, s]`` (int) or ``[s]`` -> ``[B, k]``
    - a rotary table ``[s, 1, 1, d]`` (Megatron) -> ``[k, 1, 1, d]`` for batch-shared indices ``[1, k]``,
      else the per-sample ``[k, b, 1, d]``
    - HF ``(cos, sin)``, each ``[b|1, s, d]`` -> each ``[B, k, d]``; any tuple/list is mapped element-wise
    - ``None`` -> ``None``

    Equivalent PyTorch code (rotary, per-sample)::

        table[indices.t()].squeeze(2)   # [k, b, 1, d]

    Raises:
        ValueError: a tensor of another rank, or a sequence axis shorter than the indices.
    """
    if pos is None:
        return None
    if isinstance(pos, (tuple, list)):
        return type(pos)(gather_positions(p, indices) for p in pos)
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"pos must be a tensor, a tuple of tensors or None, got {type(pos).__name__}")
    _check_mask_indices(indices, pos.device)
    b, k = indices.shape
    seq_dim = 0 if pos.dim() in (1, 4) else 1
    if pos.dim() not in (1, 2, 3, 4):
        raise ValueError(f"pos must be [s], [b, s], [b, s, d] or [s, 1, 1, d]; got {_shape(pos)}")
    if indices.numel() and pos.shape[seq_dim] <= int(indices.max()):
        raise ValueError(f"pos sequence axis {pos.shape[seq_dim]} is shorter than index {int(indices.max())} "
                         f"(pos {_shape(pos)})")
    if pos.dim() == 1:
        return pos[indices]
    if pos.dim() == 2:
        _batch_of("pos", pos, 0, indices)
        bb = max(b, pos.shape[0])
        return torch.gather(pos.expand(bb, pos.shape[1]), 1, indices.expand(bb, k))
    if pos.dim() == 3:
        _batch_of("pos", pos, 0, indices)
        bb = max(b, pos.shape[0])
        d = pos.shape[-1]
        return torch.gather(pos.expand(bb, pos.shape[1], d), 1, indices.expand(bb, k)[..., None].expand(bb, k, d))
    if pos.shape[1] != 1 or pos.shape[2] != 1:
        raise ValueError(f"rotary table must be [s, 1, 1, d], got {_shape(pos)}")
    # [s,1,1,d][k,b] -> [k,b,1,1,d] -> [k,b,1,d]
    return pos[indices.t()].squeeze(2)
