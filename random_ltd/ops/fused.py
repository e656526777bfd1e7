"""The fused gather -> layer -> scatter path of the wrapped layers, whose backward writes the input gradient once.

``kept, dropped = token_drop(x, indices)`` gathers the kept tokens and returns a handle that carries ``x`` itself
(an alias, no copy); ``token_combine(dropped, layer_out)`` scatters the layer's output back into it. Through the
unfused ops, the backward makes about four full-size memory passes per layer: gather's backward fills zeros and
scatters into them, scatter's backward copies the incoming gradient with the kept rows zeroed, and autograd adds the
two full-size gradients. Here:

- ``token_combine``'s backward passes the incoming gradient on to the carrier *unchanged* (no copy, no zeroing:
  its kept rows are wrong for x, and are never used) and gathers it for ``layer_out``;
- both gradients, the carrier's and the kept tokens' (after the layer's backward), arrive at the one
  ``token_drop`` node, whose backward writes ``grad_x = scatter(grad_carrier, grad_kept, indices)`` in one pass:
  dropped rows from the incoming gradient, kept rows from the layer's input gradient (zero when the layer does not
  use its input).

The result is exactly the gradient of ``scatter_tokens(x, layer(gather_tokens(x, indices)), indices)``. Correctness
rests on the carrier reaching nothing but ``token_combine``: that is why it is hidden in a ``DroppedTokens`` handle
which only ``token_drop`` creates and which also fixes the indices and layout, so that a combine with a foreign
carrier or other indices cannot be written. Combining the same handle several times is exact as well (the kept
rows of every carrier gradient are discarded alike). Only the indices are saved for backward.
"""

from __future__ import annotations

import torch

from random_ltd.ops.dispatch import Backend, resolve_backend
from random_ltd.ops.token_ops import (
    _check_copy_dtype,
    _check_tokens,
    _GatherTokens,
    _GatherTokensBackward,
    _ScatterTokens,
    _shape,
)

__all__ = ["DroppedTokens", "token_drop", "token_combine"]

_CREATE = object()  # only token_drop can build a DroppedTokens


class DroppedTokens:
    """What ``token_drop`` hands to ``token_combine``: the full sequence (an alias of ``x``) and the kept indices.

    Attributes:
        indices: int64 ``[b, k]``, the kept positions (strictly increasing per row).
        batch_first: layout of ``x`` (``[b, s, h]`` if True, else ``[s, b, h]``).
        shape: shape of ``x``.
    """

    __slots__ = ("_carrier", "indices", "batch_first", "_backend")

    def __init__(self, key: object, carrier: torch.Tensor, indices: torch.Tensor, batch_first: bool,
                 backend: Backend) -> None:
        if key is not _CREATE:
            raise TypeError("DroppedTokens is created by random_ltd.ops.token_drop only")
        self._carrier, self.indices, self.batch_first, self._backend = carrier, indices, batch_first, backend

    @property
    def shape(self) -> torch.Size:
        return self._carrier.shape

    def __repr__(self) -> str:
        return (f"DroppedTokens(x {_shape(self._carrier)}, indices {list(self.indices.shape)}, "
                f"batch_first={self.batch_first})")


class _TokenDrop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, indices, batch_first, backend):
        ctx.set_materialize_grads(False)  # an unused output gets None, not a full-size zero tensor
        ctx.save_for_backward(indices)
        ctx.seq_len, ctx.batch_first, ctx.backend = x.shape[1 if batch_first else 0], batch_first, backend
        kept = backend.gather(x, indices, batch_first)
        ctx.kept_shape = kept.shape
        # x returned as is: autograd makes it a view of x whose grad_fn is this node (no copy)
        return kept, x

    @staticmethod
    def backward(ctx, grad_kept, grad_carrier):
        (indices,) = ctx.saved_tensors
        if grad_carrier is None:
            if grad_kept is None:
                return None, None, None, None
            return (_GatherTokensBackward.apply(grad_kept, indices, ctx.seq_len, ctx.batch_first, ctx.backend),
                    None, None, None)
        if grad_kept is None:  # the layer ignored its input: its kept rows get no gradient from the layer
            grad_kept = grad_carrier.new_zeros(ctx.kept_shape)
        # One pass: dropped rows from the incoming gradient, kept rows from the layer's input gradient.
        return _ScatterTokens.apply(grad_carrier, grad_kept, indices, ctx.batch_first, ctx.backend), None, None, None


class _TokenCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, carrier, layer_out, indices, batch_first, backend):
        ctx.save_for_backward(indices)
        ctx.batch_first, ctx.backend = batch_first, backend
        return backend.scatter(carrier, layer_out, indices, batch_first)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        grad_out = None
        if ctx.needs_input_grad[1]:
            grad_out = _GatherTokens.apply(grad, indices, ctx.batch_first, ctx.backend)
        # Unchanged: token_drop's backward overwrites the kept rows (see the module docstring).
        return (grad if ctx.needs_input_grad[0] else None), grad_out, None, None, None


def token_drop(x: torch.Tensor, indices: torch.Tensor, *, batch_first: bool, check_indices: bool = True,
               backend: Backend | None = None) -> tuple[torch.Tensor, DroppedTokens]:
    """Gather the kept tokens for a layer, and a handle to put the layer's output back with ``token_combine``.

    Args:
        x: hidden states ``[s, b, h]`` (``[b, s, h]`` with ``batch_first``), any dtype and device.
        indices: int64 ``[b, k]`` on ``x``'s device, values in ``[0, s)``, strictly increasing along each row.
        check_indices, backend: as for ``gather_tokens``.

    Returns:
        ``(kept, dropped)``: ``kept`` is ``gather_tokens(x, indices)`` (``[k, b, h]`` / ``[b, k, h]``); ``dropped``
        is the ``DroppedTokens`` handle for ``token_combine``.

    Equivalent PyTorch code (``batch_first=True``, forward and gradients)::

        kept = torch.gather(x, 1, indices[..., None].expand(-1, -1, x.shape[-1]))
        # ... layer_out = layer(kept) ...
        out = x.scatter(1, indices[..., None].expand(-1, -1, x.shape[-1]), layer_out)   # token_combine

    Raises:
        ValueError / TypeError: as ``gather_tokens``.
    """
    _check_tokens(x, indices, batch_first, check_indices)
    be = resolve_backend(backend, x.device, x.dtype)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return be.gather(x, indices, batch_first), DroppedTokens(_CREATE, x, indices, batch_first, be)
    kept, carrier = _TokenDrop.apply(x, indices, batch_first, be)
    return kept, DroppedTokens(_CREATE, carrier, indices, batch_first, be)


def token_combine(dropped: DroppedTokens, layer_out: torch.Tensor) -> torch.Tensor:
    """Scatter a layer's output on the kept tokens back into the full sequence held by ``dropped``.

    Args:
        dropped: the handle returned by ``token_drop`` (it fixes the sequence, the indices and the layout).
        layer_out: ``[k, b, h]`` (``[b, k, h]`` with ``batch_first``) on the sequence's device; a dtype other than
            the sequence's (autocast) casts the sequence to it, as ``scatter_tokens(x.to(dtype), ...)`` would.

    Returns:
        The full sequence with the kept rows replaced by ``layer_out`` (a new tensor; x is not modified).
        Backward writes the gradient of x in one pass (see the module docstring).

    Raises:
        TypeError: ``dropped`` is not a ``DroppedTokens`` from ``token_drop``, or ``layer_out`` is not a tensor.
        ValueError: ``layer_out`` has the wrong shape or device.
    """
    if not isinstance(dropped, DroppedTokens):
        raise TypeError(f"dropped must be the DroppedTokens returned by token_drop, got {type(dropped).__name__}")
    if not isinstance(layer_out, torch.Tensor):
        raise TypeError(f"layer_out must be a tensor, got {type(layer_out).__name__}")
    carrier, indices, batch_first = dropped._carrier, dropped.indices, dropped.batch_first
    b, k = indices.shape
    expected = (b, k, carrier.shape[-1]) if batch_first else (k, b, carrier.shape[-1])
    if tuple(layer_out.shape) != expected or layer_out.device != carrier.device:
        raise ValueError(f"layer_out must have shape {list(expected)} on {carrier.device} (the kept tokens of "
                         f"{dropped!r}), got {_shape(layer_out)}")
    _check_copy_dtype("layer_out", layer_out)
    be = dropped._backend  # every backend moves every dtype of COPYABLE_DTYPES, so a cast keeps it usable
    if layer_out.dtype != carrier.dtype:
        carrier = carrier.to(layer_out.dtype)
    if not ((carrier.requires_grad or layer_out.requires_grad) and torch.is_grad_enabled()):
        return be.scatter(carrier, layer_out, indices, batch_first)
    return _TokenCombine.apply(carrier, layer_out, indices, batch_first, be)
