"""Plain PyTorch implementations of the token ops.

This module is both the ``torch`` backend (the fallback that runs on any device) and the oracle the tests compare
the C++ and CUDA kernels against. Keep it simple and obviously right; speed lives in csrc/.

The sampler is counter-based (Philox4x32-10), so that the indices depend only on
``(seed, step, micro_batch, layer, sample, position)`` and never on hidden generator state: every tensor-parallel
rank and every activation recompute redraws the same indices, and all three backends produce identical results.

Algorithm, shared bit-for-bit with csrc/cpu and csrc/cuda:

1. ``row_key = philox(key=(seed_lo, seed_hi), counter=(step_lo, step_hi, micro_batch, layer))[0:2]``
2. ``h[j] = philox(key=row_key, counter=(j, sample, 0, 0))[0]`` for every position ``j``
3. keep the ``keep`` positions with the smallest ``(h[j], j)`` pairs, returned in ascending order of ``j``.

Choosing the ``keep`` smallest of i.i.d. keys is a uniform draw of a ``keep``-subset without replacement.
"""

from __future__ import annotations

import torch

__all__ = [
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "philox4x32",
    "row_keys",
    "position_hashes",
    "sample_sorted_indices",
    "flat_rows",
    "gather_tokens",
    "scatter_tokens",
    "gather_tokens_backward",
    "slice_attention_mask",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_ROUNDS = 10


def _mulhilo(a: int | torch.Tensor, b: int) -> tuple:
    # On int64 tensors the product of two uint32 values wraps modulo 2**64, which keeps the low 64 bits exact;
    # the arithmetic shift is undone by the mask.
    prod = a * b
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4x32(counter: tuple, key: tuple) -> tuple:
    """Philox4x32-10 on Python ints or int64 tensors holding uint32 values (broadcasting)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def row_keys(seed: int, step: int, micro_batch: int, layers: range) -> list[tuple[int, int]]:
    """Per-layer Philox keys derived from ``(seed, step, micro_batch, layer)``."""
    seed_key = (seed & _MASK32, (seed >> 32) & _MASK32)
    out = []
    for layer in layers:
        r = philox4x32((step & _MASK32, (step >> 32) & _MASK32, micro_batch & _MASK32, layer & _MASK32), seed_key)
        out.append((r[0], r[1]))
    return out


def position_hashes(
    num_layers: int, batch: int, seq_len: int, *, seed: int, step: int = 0, micro_batch: int = 0,
    layer_offset: int = 0, device: torch.device | str | None = None,
) -> torch.Tensor:
    """uint32 hash of every (layer, sample, position), as int64 ``[num_layers, batch, seq_len]``."""
    keys = torch.tensor(row_keys(seed, step, micro_batch, range(layer_offset, layer_offset + num_layers)),
                        dtype=torch.int64, device=device)
    k0 = keys[:, 0].view(-1, 1, 1)
    k1 = keys[:, 1].view(-1, 1, 1)
    j = torch.arange(seq_len, dtype=torch.int64, device=device).view(1, 1, -1)
    b = torch.arange(batch, dtype=torch.int64, device=device).view(1, -1, 1)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    h, _, _, _ = philox4x32((j, b, zero, zero), (k0, k1))
    return h.expand(num_layers, batch, seq_len)


def sample_sorted_indices(
    num_layers: int, batch: int, seq_len: int, keep: int, *, seed: int, step: int = 0, micro_batch: int = 0,
    layer_offset: int = 0, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Reference sampler: int64 ``[num_layers, batch, keep]``, each row sorted, no duplicates."""
    h = position_hashes(num_layers, batch, seq_len, seed=seed, step=step, micro_batch=micro_batch,
                        layer_offset=layer_offset, device=device)
    j = torch.arange(seq_len, dtype=torch.int64, device=device)
    # (h, j) packed into one int64 so that ties in h are broken by position, identically in every backend.
    composite = (h << 31) | j
    smallest = torch.topk(composite, keep, dim=-1, largest=False, sorted=False).values
    return torch.sort(smallest & ((1 << 31) - 1), dim=-1).values


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as an integer tensor of the same element size (complex128 stays as is).

    Rows are moved on these views: index_select/index_copy_ then serve every dtype (fp8, fp4, uint16-64, complex32
    have few or no kernels) and copy bit-exactly (some float kernels rewrite NaN payloads).
    """
    size = t.element_size()
    return t.view(_INT_OF_SIZE[size]) if size in _INT_OF_SIZE else t


def flat_rows(indices: torch.Tensor, seq_len: int, batch_first: bool) -> torch.Tensor:
    """Row numbers, in the flattened ``[rows, h]`` view of x, of the kept tokens in the order of the gathered output.

    ``[b, s, h]``: row of (b, p) is ``b * s + p``, output order (b, j); ``[s, b, h]``: row ``p * b + b``, order (j, b).
    """
    b = indices.shape[0]
    batch = torch.arange(b, device=indices.device, dtype=indices.dtype).view(b, 1)
    if batch_first:
        return (indices + batch * seq_len).reshape(-1)
    return (indices * b + batch).t().reshape(-1)


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    return _as_bits(t.contiguous()).view(-1, t.shape[-1])


def gather_tokens(x: torch.Tensor, indices: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """``x[s,b,h] -> [k,b,h]`` (or ``[b,s,h] -> [b,k,h]``) keeping the rows named by ``indices[b,k]``.

    One ``index_select`` over the rows of x viewed flat (``torch.gather`` with expanded indices is 3-14x slower).
    """
    b, k = indices.shape
    s, h = x.shape[1 if batch_first else 0], x.shape[-1]
    if indices.numel() == 0 or h == 0:
        return x.new_empty((b, k, h) if batch_first else (k, b, h))
    out = _rows_view(x).index_select(0, flat_rows(indices, s, batch_first))
    return out.view(x.dtype).view((b, k, h) if batch_first else (k, b, h))


def scatter_tokens(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """Out of place: a copy of ``x`` whose rows named by ``indices[b,k]`` (distinct per row) are replaced by ``y``."""
    out = x.contiguous().clone()
    if indices.numel() == 0 or x.shape[-1] == 0:
        return out
    _rows_view(out).index_copy_(0, flat_rows(indices, x.shape[1 if batch_first else 0], batch_first), _rows_view(y))
    return out


def gather_tokens_backward(grad: torch.Tensor, indices: torch.Tensor, seq_len: int, batch_first: bool) -> torch.Tensor:
    """The gradient of ``gather_tokens``: zeros in x's layout, rows ``(b, indices[b, j])`` = ``grad[(b, j)]``."""
    b, h = indices.shape[0], grad.shape[-1]
    out = grad.new_zeros((b, seq_len, h) if batch_first else (seq_len, b, h))
    if indices.numel() == 0 or h == 0:
        return out
    _rows_view(out).index_copy_(0, flat_rows(indices, seq_len, batch_first), _rows_view(grad))
    return out


def slice_attention_mask(mask: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``mask[b|1, heads, s, s]`` -> ``[b, heads, k, k]`` = ``mask[b or 0, :, idx[b, p], idx[b, q]]``."""
    b, k = indices.shape
    heads, s = mask.shape[1], mask.shape[-1]
    bits = _as_bits(mask)
    rows = torch.gather(bits.expand(b, heads, s, s), 2, indices.view(b, 1, k, 1).expand(b, heads, k, s))
    return torch.gather(rows, 3, indices.view(b, 1, 1, k).expand(b, heads, k, k)).view(mask.dtype)
