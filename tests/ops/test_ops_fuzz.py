"""Hypothesis fuzzing of the public token ops against plain PyTorch (torch.gather / scatter / index_select), never the
project's own reference: dtypes, both layouts, non-contiguous strides, every usable backend, and bad indices (which
must raise ValueError before any kernel runs). Bounded examples, no deadline: quick enough for CI.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from random_ltd.ops import gather_positions, gather_tokens, scatter_tokens, slice_attention_mask
from random_ltd.ops.dispatch import PRIORITY

BACKENDS = [b for b in PRIORITY if not b.not_supported_reasons(torch.device("cpu"))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8,
          torch.bool, torch.complex64]
LAYOUTS = ["contiguous", "transposed", "strided-hidden", "expanded-batch"]
BAD = ["negative", "too-large", "duplicate", "descending"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _values(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


def _tokens(b: int, s: int, h: int, batch_first: bool, dtype: torch.dtype, layout: str,
            gen: torch.Generator) -> torch.Tensor:
    """A ``[b, s, h]`` / ``[s, b, h]`` tensor with the requested memory layout (same values either way)."""
    shape = (b, s, h) if batch_first else (s, b, h)
    if layout == "transposed":  # stored in the other layout, then transposed back into this one
        return _values((shape[1], shape[0], h), dtype, gen).transpose(0, 1)
    if layout == "strided-hidden":
        return _values((*shape[:2], 2 * h), dtype, gen)[..., ::2]
    if layout == "expanded-batch":  # stride 0 along the batch
        one = _values((1, s, h) if batch_first else (s, 1, h), dtype, gen)
        return one.expand(shape)
    return _values(shape, dtype, gen)


def _sorted_indices(b: int, s: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(s, generator=gen)[:k].sort().values for _ in range(b)])


def _spoil(idx: torch.Tensor, s: int, how: str, gen: torch.Generator) -> torch.Tensor:
    idx = idx.clone()
    row = int(torch.randint(0, idx.shape[0], (1,), generator=gen))
    col = int(torch.randint(0, idx.shape[1], (1,), generator=gen))
    if how == "negative":
        idx[row, col] = -int(torch.randint(1, 2 * s + 1, (1,), generator=gen))
    elif how == "too-large":
        idx[row, col] = s + int(torch.randint(0, 2 * s + 1, (1,), generator=gen))
    elif how == "duplicate":
        idx[row, min(col + 1, idx.shape[1] - 1)] = idx[row, max(col, 1) - 1]
    else:
        idx[row] = idx[row].flip(0)
    return idx


def torch_gather(x: torch.Tensor, idx: torch.Tensor, batch_first: bool) -> torch.Tensor:
    index = idx if batch_first else idx.t()
    return torch.gather(x, 1 if batch_first else 0, index[..., None].expand(*index.shape, x.shape[-1]))


def torch_scatter(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, batch_first: bool) -> torch.Tensor:
    index = idx if batch_first else idx.t()
    return x.scatter(1 if batch_first else 0, index[..., None].expand(*index.shape, x.shape[-1]), y)


@SETTINGS
@given(b=st.integers(1, 3), s=st.integers(1, 40), h=st.integers(1, 9), data=st.data(), batch_first=st.booleans(),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), backend=st.sampled_from(BACKENDS),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_gather_scatter(b, s, h, data, batch_first, dtype, layout, backend, seed) -> None:
    k = data.draw(st.integers(1, s), label="k")
    gen = torch.Generator().manual_seed(seed)
    x = _tokens(b, s, h, batch_first, dtype, layout, gen)
    idx = _sorted_indices(b, s, k, gen)
    g = gather_tokens(x, idx, batch_first=batch_first, backend=backend)
    assert g.dtype == dtype and torch.equal(g, torch_gather(x, idx, batch_first))
    y = _tokens(b, k, h, batch_first, dtype, data.draw(st.sampled_from(LAYOUTS), label="y layout"), gen)
    before = x.clone()
    out = scatter_tokens(x, y, idx, batch_first=batch_first, backend=backend)
    assert torch.equal(out, torch_scatter(x, y, idx, batch_first))
    assert torch.equal(x, before)

    if dtype in (torch.float32, torch.float64):  # gradients against torch's, for a random upstream gradient
        xr, yr = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        xt, yt = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        w_g, w_s = _values(g.shape, dtype, gen), _values(x.shape, dtype, gen)
        ours = (gather_tokens(xr, idx, batch_first=batch_first, backend=backend) * w_g).sum() + (
            scatter_tokens(xr, yr, idx, batch_first=batch_first, backend=backend) * w_s).sum()
        theirs = (torch_gather(xt, idx, batch_first) * w_g).sum() + (
            torch_scatter(xt, yt, idx, batch_first) * w_s).sum()
        ours.backward()
        theirs.backward()
        assert torch.equal(xr.grad, xt.grad) and torch.equal(yr.grad, yt.grad)


@SETTINGS
@given(b=st.integers(1, 3), s=st.integers(2, 30), data=st.data(), batch_first=st.booleans(),
       how=st.sampled_from(BAD), backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**31 - 1))
def test_fuzz_bad_indices_raise_value_error(b, s, data, batch_first, how, backend, seed) -> None:
    k = data.draw(st.integers(1 if how in ("negative", "too-large") else 2, s), label="k")
    gen = torch.Generator().manual_seed(seed)
    x = _tokens(b, s, 3, batch_first, torch.float32, "contiguous", gen)
    bad = _spoil(_sorted_indices(b, s, k, gen), s, how, gen)
    y = torch.zeros((b, k, 3) if batch_first else (k, b, 3))
    with pytest.raises(ValueError, match="indices must"):
        gather_tokens(x, bad, batch_first=batch_first, backend=backend)
    with pytest.raises(ValueError, match="indices must"):
        scatter_tokens(x, y, bad, batch_first=batch_first, backend=backend)
    if how in ("negative", "too-large"):  # the mask and position ops take any order, but only values in range
        with pytest.raises(ValueError, match="indices must lie in"):
            slice_attention_mask(torch.ones(1, 1, s, s, dtype=torch.bool), bad)
        with pytest.raises(ValueError, match="indices must lie in"):
            gather_positions(torch.arange(s), bad)


@SETTINGS
@given(b=st.integers(1, 3), s=st.integers(1, 30), data=st.data(), mb=st.sampled_from(["shared", "per-sample"]),
       heads=st.integers(1, 3), dtype=st.sampled_from([torch.bool, torch.float32, torch.bfloat16]),
       transposed=st.booleans(), backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**31 - 1))
def test_fuzz_slice_mask_and_positions(b, s, data, mb, heads, dtype, transposed, backend, seed) -> None:
    k = data.draw(st.integers(1, s), label="k")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(s, generator=gen)[:k] for _ in range(b)])  # any order is fine here
    mask = _values((1 if mb == "shared" else b, heads, s, s), dtype, gen)
    if transposed:
        mask = mask.transpose(2, 3)
    expected = torch.stack([mask[i % mask.shape[0]].index_select(1, idx[i]).index_select(2, idx[i])
                            for i in range(b)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANDOM_LTD_BACKEND", backend.NAME)
        assert torch.equal(slice_attention_mask(mask, idx), expected)
    pad = _values((b, s), torch.bool, gen)
    assert torch.equal(slice_attention_mask(pad, idx), torch.stack([pad[i].index_select(0, idx[i]) for i in range(b)]))
    table = _values((s, 1, 1, 4), torch.float32, gen)
    assert torch.equal(gather_positions(table, idx),
                       torch.stack([table[:, 0].index_select(0, idx[i]) for i in range(b)], dim=1))
    ids = torch.arange(s) * 3
    assert torch.equal(gather_positions(ids, idx), torch.stack([ids.index_select(0, idx[i]) for i in range(b)]))
