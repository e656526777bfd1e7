"""Public token ops: validation, backend dispatch and autograd.

Every op validates its arguments before any kernel runs and raises ``ValueError``/``TypeError`` naming the argument
and the expected form. Autograd saves only the indices (never an activation): the backward of a gather is a scatter
into zeros (one pass, ``gather_tokens_backward``), the backward of a scatter is a gather plus a copy with the kept rows
zeroed, each correct on its own and differentiable again (double backward). The wrapped layers use the fused pair of
random_ltd/ops/fused.py instead, whose backward writes the input gradient in one pass.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from random_ltd.ops.dispatch import Backend, dtype_reasons, resolve_backend, select_backend
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


def _check_copy_dtype(name: str, t: torch.Tensor) -> None:
    reasons = dtype_reasons(t.dtype)
    if reasons:
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, which the token ops do not copy "
                        f"({reasons[0]})")


def _check_index_values(indices: torch.Tensor, seq_len: int, increasing: bool, what: str) -> None:
    """Index values in ``[0, seq_len)`` and, with ``increasing``, strictly increasing along each row.

    Eager: one host sync, then a ValueError naming the argument. Under ``torch.compile`` a data-dependent Python
    branch would break the graph, so the same condition becomes an in-graph assert (``torch._assert_async``: a
    RuntimeError at run time on CPU, a device-side assert on CUDA). Meta and fake tensors (FakeTensorMode outside
    torch.compile) have no values to check.
    """
    if indices.numel() == 0 or indices.device.type == "meta":
        return
    compiling = torch.compiler.is_compiling()
    if not compiling and is_fake(indices):
        return
    if indices.device.type == "cpu" and not compiling and type(indices) is torch.Tensor:
        # On a numpy view of the same memory: a handful of torch ops on small tensors costs tens of microseconds
        # in dispatch alone. Sorted rows are in range iff their first and last entries are.
        a = indices.numpy()
        if increasing:
            ok = bool(a[:, 0].min() >= 0) and bool(a[:, -1].max() < seq_len) and bool((a[:, 1:] > a[:, :-1]).all())
        else:
            ok = bool(a.min() >= 0) and bool(a.max() < seq_len)
    else:  # one device sync (eager) or one in-graph assert (compiled)
        if increasing:
            ok_t = (indices[:, 0].min() >= 0) & (indices[:, -1].max() < seq_len)
            if indices.shape[1] > 1:
                ok_t = ok_t & (indices[:, 1:] > indices[:, :-1]).all()
        else:
            ok_t = ((indices >= 0) & (indices < seq_len)).all()
        if compiling:
            order = " and strictly increasing along each row" if increasing else ""
            torch._assert_async(ok_t, f"random_ltd: indices must lie in [0, {what}){order}")
            return
        ok = bool(ok_t)
    if ok:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= seq_len:
        raise ValueError(f"indices must lie in [0, {seq_len}) ({what} = {seq_len}); got min {lo}, max {hi} "
                         f"(indices {_shape(indices)})")
    bad = (indices[:, 1:] <= indices[:, :-1]).nonzero()[0].tolist()
    row, col = bad[0], bad[1]
    raise ValueError(f"indices must be strictly increasing along each row (sorted, no duplicates; a repeated "
                     f"position would get a wrong gradient): row {row} has {int(indices[row, col])} then "
                     f"{int(indices[row, col + 1])} at positions {col}, {col + 1} (indices {_shape(indices)})")


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
    _check_copy_dtype("x", x)
    b, s = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    if indices.shape[0] != b:
        raise ValueError(f"indices batch {indices.shape[0]} != x batch {b} (x {_shape(x)}, batch_first={batch_first})")
    if indices.shape[1] > s:
        raise ValueError(f"indices keep {indices.shape[1]} > sequence length {s} of x {_shape(x)}")
    if check_values:
        _check_index_values(indices, s, True, "the sequence length of x")


# Autograd. Each backward is itself built from these differentiable Functions, so double backward (gradgradcheck,
# Hessian-vector products) is exact on every backend: the gradient of a gather is a scatter into zeros
# (_GatherTokensBackward), whose gradient is the gather again; the gradient of a scatter is a gather (for y) and a
# copy with the kept rows zeroed (for x, a scatter of zeros, which is its own gradient). Only indices are saved.


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, indices, batch_first, backend):
        ctx.save_for_backward(indices)
        ctx.seq_len, ctx.batch_first, ctx.backend = x.shape[1 if batch_first else 0], batch_first, backend
        return backend.gather(x, indices, batch_first)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return _GatherTokensBackward.apply(grad, indices, ctx.seq_len, ctx.batch_first, ctx.backend), None, None, None


class _GatherTokensBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, indices, seq_len, batch_first, backend):
        ctx.save_for_backward(indices)
        ctx.batch_first, ctx.backend = batch_first, backend
        return backend.gather_backward(grad, indices, seq_len, batch_first)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return _GatherTokens.apply(grad, indices, ctx.batch_first, ctx.backend), None, None, None, None


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
            grad_x = _ScatterTokens.apply(grad, grad.new_zeros(ctx.y_shape), indices, ctx.batch_first, ctx.backend)
        if ctx.needs_input_grad[1]:
            grad_y = _GatherTokens.apply(grad, indices, ctx.batch_first, ctx.backend)
        return grad_x, grad_y, None, None, None


def gather_tokens(x: torch.Tensor, indices: torch.Tensor, *, batch_first: bool, check_indices: bool = True,
                  backend: Backend | None = None) -> torch.Tensor:
    """Keep the tokens named by ``indices``: ``[s,b,h] -> [k,b,h]`` or, with ``batch_first``, ``[b,s,h] -> [b,k,h]``.

    Args:
        x: hidden states, any dtype, any device; non-contiguous input is made contiguous for the compiled kernels.
        indices: int64 ``[b, k]`` on ``x``'s device, values in ``[0, s)``, strictly increasing along each row (as
            from ``sample_sorted_indices``): a repeated position would need its gradient accumulated, which the
            row-copy kernels do not do, so it is refused.
        check_indices: verify index values and order (one host sync; a device sync on GPU; an in-graph assert under
            ``torch.compile``). With False the caller guarantees them (internal callers that drew the indices
            themselves): out-of-range values are still refused by the CPU kernels, and duplicates give a wrong
            gradient.
        backend: force a backend (default: ``select_backend(x.device, x.dtype)``); one that cannot run on ``x``
            raises with its reasons.

    Equivalent PyTorch code (``batch_first=True``)::

        torch.gather(x, 1, indices[..., None].expand(-1, -1, x.shape[-1]))

    Differentiable; saves only ``indices``.

    Raises:
        ValueError / TypeError: wrong rank, dtype, device or batch; indices out of range or not strictly increasing.
        RuntimeError: a forced ``backend`` that cannot run here.
    """
    _check_tokens(x, indices, batch_first, check_indices)
    be = resolve_backend(backend, x.device, x.dtype)
    if not (x.requires_grad and torch.is_grad_enabled()):  # no graph to record: skip autograd.Function's overhead
        return be.gather(x, indices, batch_first)
    return _GatherTokens.apply(x, indices, batch_first, be)


def scatter_tokens(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, *, batch_first: bool,
                   check_indices: bool = True, backend: Backend | None = None) -> torch.Tensor:
    """Out-of-place combine: a copy of ``x`` whose positions ``indices`` hold the rows of ``y``.

    Args:
        x: full sequence ``[s,b,h]`` (``[b,s,h]`` with ``batch_first``).
        y: kept tokens ``[k,b,h]`` (``[b,k,h]``), same dtype and device as ``x``.
        indices: int64 ``[b, k]``, values in ``[0, s)``, strictly increasing along each row.
        check_indices, backend: as for ``gather_tokens``.

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
    be = resolve_backend(backend, x.device, x.dtype)
    if not ((x.requires_grad or y.requires_grad) and torch.is_grad_enabled()):
        return be.scatter(x, y, indices, batch_first)
    return _ScatterTokens.apply(x, y, indices, batch_first, be)


def _check_mask_indices(indices: torch.Tensor, device: torch.device, seq_len: int, what: str) -> None:
    """Indices of the mask/position ops: int64 ``[b, k]`` on ``device``, ``k <= seq_len``, values in range.

    Order is not required here (nothing is differentiated through a gather with the indices' own positions).
    """
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.dtype != torch.int64:
        got = _shape(indices) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be an int64 tensor [b, k], got {got}")
    if indices.device != device:
        raise ValueError(f"indices must be on {device}, got {indices.device}")
    if indices.shape[1] > seq_len:
        raise ValueError(f"indices keep {indices.shape[1]} > {what} {seq_len}")
    _check_index_values(indices, seq_len, False, what)


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
    where ``B`` is the indices batch (or the mask batch when ``indices`` is batch-shared ``[1, k]``). ``indices``:
    int64 ``[b, k]`` on the mask's device, values in ``[0, s)`` (any order).

    For sorted indices, a sliced causal mask equals a fresh causal ``k x k`` mask; padding and EOD-reset masks are
    sliced correctly on both axes.

    Equivalent PyTorch code (4-D square form)::

        torch.stack([m[i % m.shape[0]][:, idx][:, :, idx] for i, idx in enumerate(indices)])

    Raises:
        ValueError: a mask of another rank (0-d included), a non-square 4-D mask with more than one query row, or
            ``indices`` of the wrong form or with values outside ``[0, s)`` (checked before any kernel runs).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dim() not in (2, 4):
        raise ValueError(f"mask must be None, [b, s], [b, 1, 1, s] or [b, h, s, s]; got {_shape(mask)}")
    _check_copy_dtype("mask", mask)
    s = mask.shape[-1]
    _check_mask_indices(indices, mask.device, s, "the mask sequence length")
    k = indices.shape[1]
    _batch_of("mask", mask, 0, indices)
    b = max(mask.shape[0], indices.shape[0])
    idx = indices.expand(b, k)
    if mask.dim() == 2:
        return torch.gather(mask.expand(b, s), 1, idx)
    if mask.shape[2] == 1:
        heads = mask.shape[1]
        return torch.gather(mask.expand(b, heads, 1, s), 3, idx.view(b, 1, 1, k).expand(b, heads, 1, k))
    if mask.shape[2] != s:
        raise ValueError(f"4-D mask must be square over the last two axes or have one query row, got {_shape(mask)}")
    # The kernels take a mask batch of 1 (shared) or b, and per-sample indices [b, k].
    return select_backend(mask.device, mask.dtype).slice_mask(mask, idx)


def gather_positions(pos, indices: torch.Tensor):
    """Positions of the kept tokens, for every position form a layer receives.

    - position ids ``[b|1, s]`` (int) or ``[s]`` -> ``[B, k]``
    - a rotary table ``[s, 1, 1, d]`` (Megatron) -> ``[k, 1, 1, d]`` for batch-shared indices ``[1, k]``,
      else the per-sample ``[k, b, 1, d]``
    - HF ``(cos, sin)``, each ``[b|1, s, d]`` -> each ``[B, k, d]``; any tuple/list is mapped element-wise
    - ``None`` -> ``None``

    ``indices``: int64 ``[b, k]`` on the positions' device, values in ``[0, s)`` (negative values would wrap).

    Equivalent PyTorch code (rotary, per-sample)::

        table[indices.t()].squeeze(2)   # [k, b, 1, d]

    Raises:
        ValueError: a tensor of another rank, a sequence axis shorter than the indices, or indices outside
            ``[0, s)``.
    """
    if pos is None:
        return None
    if isinstance(pos, (tuple, list)):
        return type(pos)(gather_positions(p, indices) for p in pos)
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"pos must be a tensor, a tuple of tensors or None, got {type(pos).__name__}")
    if pos.dim() not in (1, 2, 3, 4):
        raise ValueError(f"pos must be [s], [b, s], [b, s, d] or [s, 1, 1, d]; got {_shape(pos)}")
    seq_dim = 0 if pos.dim() in (1, 4) else 1
    _check_mask_indices(indices, pos.device, pos.shape[seq_dim], "the pos sequence axis")
    b, k = indices.shape
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
