"""The compiled CPU ops (csrc/cpu via torch.ops.random_ltd.*) against random_ltd/ops/reference.py, bit for bit.

Data are random bit patterns (NaN payloads and all) and comparisons are on the raw bytes, so any conversion or
reinterpretation inside a kernel shows up. CUDA runs the same checks in tests/ops/test_cuda.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import (
    DTYPES,
    GATHER_CASES,
    LAYOUTS,
    SAMPLER_CASES,
    as_int,
    assert_bitwise_equal,
    bits,
    random_indices,
    random_tensor,
    reference_slice,
    sampler_case_id,
)

from random_ltd.ops import _extension
from random_ltd.ops import reference as ref

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    STATUS = _extension.load()

pytestmark = [
    pytest.mark.skipif(
        not STATUS.loaded,
        reason=f"random_ltd extension not loaded: {STATUS.reason} (pip install --no-build-isolation -e .)",
    ),
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental"),
]

ops = torch.ops.random_ltd


def check_gather_scatter(x: torch.Tensor, idx: torch.Tensor, batch_first: bool, gen: torch.Generator) -> None:
    """Both ops equal the reference on the same bytes (integer views; see as_int)."""
    x_before = x.clone()
    g = ops.gather_tokens(x, idx, batch_first)
    assert_bitwise_equal(as_int(g), ref.gather_tokens(as_int(x), idx, batch_first))
    y = random_tensor(tuple(g.shape), x.dtype, gen).to(x.device)
    out = ops.scatter_tokens(x, y, idx, batch_first)
    assert_bitwise_equal(as_int(out), ref.scatter_tokens(as_int(x), as_int(y), idx, batch_first))
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(bits(x), bits(x_before)), "scatter_tokens must be out of place"
    s = x.shape[1 if batch_first else 0]
    back = ops.gather_tokens_backward(y, idx, s, batch_first)
    assert_bitwise_equal(as_int(back), ref.gather_tokens_backward(as_int(y), idx, s, batch_first))


@pytest.mark.parametrize("batch_first", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("s,k,h", GATHER_CASES)
def test_gather_scatter_bitwise(s: int, k: int, h: int, dtype: torch.dtype, batch_first: bool) -> None:
    gen = torch.Generator().manual_seed(s * 7919 + k * 31 + h)
    b = 2
    x = random_tensor((b, s, h) if batch_first else (s, b, h), dtype, gen)
    check_gather_scatter(x, random_indices(b, s, k, gen), batch_first, gen)


@pytest.mark.parametrize("batch_first", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_gather_scatter_real_dtype_reference(dtype: torch.dtype, batch_first: bool) -> None:
    """On NaN-free data the ops also equal the reference run on the real dtype."""
    gen = torch.Generator().manual_seed(5)
    b, s, k, h = 3, 97, 40, 33
    x = torch.randn((b, s, h) if batch_first else (s, b, h), generator=gen).to(dtype)
    idx = random_indices(b, s, k, gen)
    g = ops.gather_tokens(x, idx, batch_first)
    assert torch.equal(g, ref.gather_tokens(x, idx, batch_first))
    y = torch.randn(g.shape, generator=gen).to(dtype)
    assert torch.equal(ops.scatter_tokens(x, y, idx, batch_first), ref.scatter_tokens(x, y, idx, batch_first))


@pytest.mark.parametrize("batch_first", LAYOUTS)
def test_gather_scatter_long_sequence(batch_first: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    s, b, k, h = 32768, 2, 4096, 16
    x = random_tensor((b, s, h) if batch_first else (s, b, h), torch.bfloat16, gen)
    idx = ref.sample_sorted_indices(1, b, s, k, seed=11)[0]
    check_gather_scatter(x, idx, batch_first, gen)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64, torch.complex32, torch.int64, torch.uint8,
                                   torch.int16, torch.float8_e4m3fn, torch.uint16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_gather_scatter_other_dtypes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = random_tensor((33, 3, 5), dtype, gen)
    check_gather_scatter(x, random_indices(3, 33, 9, gen), False, gen)


def test_gather_empty() -> None:
    x = torch.randn(5, 0, 4)
    idx = torch.empty(0, 3, dtype=torch.long)
    assert ops.gather_tokens(x, idx, False).shape == (3, 0, 4)
    assert ops.scatter_tokens(x, torch.empty(3, 0, 4), idx, False).shape == (5, 0, 4)
    assert ops.gather_tokens_backward(torch.empty(3, 0, 4), idx, 5, False).shape == (5, 0, 4)
    assert torch.equal(ops.gather_tokens_backward(torch.empty(2, 0, 4), torch.empty(2, 0, dtype=torch.long), 3, True),
                       torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------------------------------------------
# Sampler

@pytest.mark.parametrize("case", SAMPLER_CASES, ids=sampler_case_id)
def test_sampler_matches_reference(case: tuple[int, ...]) -> None:
    layers, batch, s, k, seed, step, mb, off = case
    out = torch.full((layers, batch, k), -1, dtype=torch.long)
    ops.sample_sorted_indices_(out, s, seed, step, mb, off)
    expected = ref.sample_sorted_indices(layers, batch, s, k, seed=seed, step=step, micro_batch=mb, layer_offset=off)
    assert torch.equal(out, expected)


def find_threshold_tie(seq_len: int = 32768) -> tuple[int, int]:
    """(seed, keep) such that two positions share the keep-th smallest hash and only the lower one is kept."""
    for seed in range(200):
        h = ref.position_hashes(1, 1, seq_len, seed=seed)[0, 0]
        values, counts = torch.unique(h, return_counts=True)
        dup = values[counts > 1]
        if dup.numel():
            return seed, int((h < dup[0]).sum()) + 1
    raise AssertionError("no duplicated hash found")  # ~1/8 chance per seed; unreachable in practice


def test_sampler_tie_at_threshold_keeps_lower_position() -> None:
    s = 32768
    seed, keep = find_threshold_tie(s)
    out = torch.empty(1, 1, keep, dtype=torch.long)
    ops.sample_sorted_indices_(out, s, seed, 0, 0, 0)
    assert torch.equal(out, ref.sample_sorted_indices(1, 1, s, keep, seed=seed))


def test_sampler_layers_are_offset_rows() -> None:
    """Rows for layers offset..offset+L-1 equal separate single-layer draws (pipeline stages agree)."""
    full = torch.empty(5, 2, 30, dtype=torch.long)
    ops.sample_sorted_indices_(full, 100, 7, 3, 1, 10)
    for layer in range(5):
        one = torch.empty(1, 2, 30, dtype=torch.long)
        ops.sample_sorted_indices_(one, 100, 7, 3, 1, 10 + layer)
        assert torch.equal(one[0], full[layer])


def test_sampler_empty_keep() -> None:
    out = torch.empty(2, 3, 0, dtype=torch.long)
    ops.sample_sorted_indices_(out, 10, 0, 0, 0, 0)
    assert out.shape == (2, 3, 0)


# --------------------------------------------------------------------------------------------------------------
# Attention-mask slicing


@pytest.mark.parametrize("mb", [1, 3], ids=lambda m: f"mb{m}")
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("s,k", [(1, 1), (97, 1), (97, 40), (97, 97), (300, 123)])
def test_slice_attention_mask(mb: int, dtype: torch.dtype, s: int, k: int) -> None:
    gen = torch.Generator().manual_seed(s + k + mb)
    b, heads = 3, 2
    mask = random_tensor((mb, heads, s, s), dtype, gen)
    idx = random_indices(b, s, k, gen)
    assert_bitwise_equal(as_int(ops.slice_attention_mask(mask, idx)), reference_slice(as_int(mask), idx))


def test_slice_attention_mask_strided() -> None:
    """Expanded and transposed masks are read through their strides (no copy of the full mask)."""
    gen = torch.Generator().manual_seed(3)
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    idx = random_indices(4, 64, 20, gen)
    expanded = causal.view(1, 1, 64, 64).expand(4, 3, 64, 64)
    assert_bitwise_equal(ops.slice_attention_mask(expanded, idx), reference_slice(expanded, idx))
    transposed = random_tensor((4, 2, 64, 64), torch.float32, gen).transpose(2, 3)
    assert_bitwise_equal(as_int(ops.slice_attention_mask(transposed, idx)), reference_slice(as_int(transposed), idx))


# --------------------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, dispatcher and AOT tracing agree with the real kernel.


def test_opcheck_gather() -> None:
    x = torch.randn(20, 3, 8)
    torch.library.opcheck(ops.gather_tokens.default, (x, random_indices(3, 20, 5, torch.Generator()), False))


def test_opcheck_scatter() -> None:
    x = torch.randn(3, 20, 8)
    idx = random_indices(3, 20, 5, torch.Generator())
    torch.library.opcheck(ops.scatter_tokens.default, (x, torch.randn(3, 5, 8), idx, True))


@pytest.mark.parametrize("batch_first", LAYOUTS)
def test_opcheck_gather_backward(batch_first: bool) -> None:
    idx = random_indices(3, 20, 5, torch.Generator())
    grad = torch.randn((3, 5, 8) if batch_first else (5, 3, 8))
    torch.library.opcheck(ops.gather_tokens_backward.default, (grad, idx, 20, batch_first))


def test_gather_backward_writes_every_row() -> None:
    """Output memory recycled from a tensor full of NaNs: every row not named by the indices must read zero."""
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        torch.full((4096, 4, 64), float("nan")).sum()  # leaves NaN-filled blocks for the allocator to hand out
        grad = torch.randn(300, 4, 64, generator=gen)
        idx = random_indices(4, 4096, 300, gen)
        back = ops.gather_tokens_backward(grad, idx, 4096, False)
        assert torch.equal(back, ref.gather_tokens_backward(grad, idx, 4096, False))


def test_opcheck_sampler() -> None:
    torch.library.opcheck(ops.sample_sorted_indices_.default, (torch.empty(2, 3, 10, dtype=torch.long), 50, 1, 2, 3, 4))


def test_opcheck_slice_mask() -> None:
    mask = torch.randn(1, 2, 30, 30)
    torch.library.opcheck(ops.slice_attention_mask.default, (mask, random_indices(3, 30, 7, torch.Generator())))


# --------------------------------------------------------------------------------------------------------------
# Validation: every bad argument raises RuntimeError naming it.


def _bad_calls() -> list:
    x = torch.randn(10, 2, 4)
    idx = torch.tensor([[0, 3], [1, 9]])
    y = torch.randn(2, 2, 4)
    out = torch.empty(1, 2, 3, dtype=torch.long)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    return [
        ("idx-int32", lambda: ops.gather_tokens(x, idx.int(), False), "indices must be int64"),
        ("idx-1d", lambda: ops.gather_tokens(x, idx[0], False), "indices must be 2-D"),
        ("idx-noncontig", lambda: ops.gather_tokens(x, idx.t().contiguous().t(), False), "indices must be contiguous"),
        ("x-2d", lambda: ops.gather_tokens(x[0], idx, False), "x must be 3-D"),
        ("x-noncontig", lambda: ops.gather_tokens(x.transpose(0, 1).contiguous().transpose(0, 1)[:, :, :3], idx,
                                                  False), "x must be contiguous"),
        ("batch", lambda: ops.gather_tokens(x, idx, True), "indices has batch"),
        ("keep>s", lambda: ops.gather_tokens(x, torch.zeros(2, 11, dtype=torch.long), False), "keeps 11 tokens"),
        ("idx-range", lambda: ops.gather_tokens(x, torch.tensor([[0, 10], [1, 2]]), False), "out of range"),
        ("idx-negative", lambda: ops.gather_tokens(x, torch.tensor([[0, -1], [1, 2]]), False), "out of range"),
        ("x-bits", lambda: ops.gather_tokens(torch.zeros(10, 2, 4, dtype=torch.bits8), idx, False),
         "unsupported dtype Bits8 of x"),
        ("mask-bits", lambda: ops.slice_attention_mask(torch.zeros(2, 1, 10, 10, dtype=torch.bits16), idx),
         "unsupported dtype Bits16 of mask"),
        ("y-dtype", lambda: ops.scatter_tokens(x, y.double(), idx, False), "y has dtype"),
        ("y-shape", lambda: ops.scatter_tokens(x, torch.randn(2, 2, 5), idx, False), "y must have shape"),
        ("y-2d", lambda: ops.scatter_tokens(x, y[0], idx, False), "y must be 3-D"),
        ("scatter-range", lambda: ops.scatter_tokens(x, y, torch.tensor([[0, 12], [1, 2]]), False), "out of range"),
        ("gb-shape", lambda: ops.gather_tokens_backward(torch.randn(2, 1, 4), idx, 10, False), "grad must have shape"),
        ("gb-seq", lambda: ops.gather_tokens_backward(y, idx, 1, False), "seq_len must be >= keep"),
        ("gb-range", lambda: ops.gather_tokens_backward(y, idx, 5, False), "out of range"),
        ("gb-dtype", lambda: ops.gather_tokens_backward(y.view(torch.bits16), idx, 10, False),
         "unsupported dtype Bits16 of grad"),
        ("out-int32", lambda: ops.sample_sorted_indices_(out.int(), 10, 0, 0, 0, 0), "out must be int64"),
        ("out-2d", lambda: ops.sample_sorted_indices_(out[0], 10, 0, 0, 0, 0), "out must be 3-D"),
        ("out-noncontig", lambda: ops.sample_sorted_indices_(out.transpose(1, 2), 10, 0, 0, 0, 0),
         "out must be contiguous"),
        ("keep>seq", lambda: ops.sample_sorted_indices_(out, 2, 0, 0, 0, 0), "seq_len is 2"),
        ("seq-huge", lambda: ops.sample_sorted_indices_(out, 2**31, 0, 0, 0, 0), "seq_len must be in"),
        ("seed<0", lambda: ops.sample_sorted_indices_(out, 10, -1, 0, 0, 0), "seed must be non-negative"),
        ("step<0", lambda: ops.sample_sorted_indices_(out, 10, 0, -1, 0, 0), "step must be non-negative"),
        ("mb<0", lambda: ops.sample_sorted_indices_(out, 10, 0, 0, -1, 0), "micro_batch must be non-negative"),
        ("off<0", lambda: ops.sample_sorted_indices_(out, 10, 0, 0, 0, -1), "layer_offset must be non-negative"),
        ("mask-3d", lambda: ops.slice_attention_mask(mask[0], idx), "mask must be 4-D"),
        ("mask-square", lambda: ops.slice_attention_mask(mask[..., :9], idx), "must be square"),
        ("mask-batch", lambda: ops.slice_attention_mask(torch.ones(3, 1, 10, 10), idx), "mask batch 3"),
        ("mask-idx", lambda: ops.slice_attention_mask(mask, idx.int()), "indices must be int64"),
        ("mask-range", lambda: ops.slice_attention_mask(mask, torch.tensor([[0, 10], [1, 2]])), "out of range"),
    ]


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=i) for i, c, m in _bad_calls()])
def test_bad_arguments_raise(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call()


# --------------------------------------------------------------------------------------------------------------
# Property test over shapes, layouts and dtypes.


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 4),
    s=st.integers(1, 300),
    h=st.integers(1, 70),
    keep_frac=st.floats(0.0, 1.0),
    batch_first=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**63 - 1),
    step=st.integers(0, 2**40),
    layers=st.integers(1, 3),
)
def test_property_all_ops(b: int, s: int, h: int, keep_frac: float, batch_first: bool, dtype: torch.dtype, seed: int,
                          step: int, layers: int) -> None:
    k = max(1, round(keep_frac * s))
    out = torch.empty(layers, b, k, dtype=torch.long)
    ops.sample_sorted_indices_(out, s, seed, step, 0, 1)
    assert torch.equal(out, ref.sample_sorted_indices(layers, b, s, k, seed=seed, step=step, layer_offset=1))
    gen = torch.Generator().manual_seed(seed % 2**31)
    x = random_tensor((b, s, h) if batch_first else (s, b, h), dtype, gen)
    check_gather_scatter(x, out[-1], batch_first, gen)
    mask = random_tensor((1, 1, s, s), dtype, gen)
    assert_bitwise_equal(as_int(ops.slice_attention_mask(mask, out[0])), reference_slice(as_int(mask), out[0]))


# --------------------------------------------------------------------------------------------------------------
# Loader


def test_status_reports_cpu_build() -> None:
    assert STATUS.source in ("prebuilt", "jit")
    assert STATUS.has_cuda == torch._C._dispatch_has_kernel_for_dispatch_key("random_ltd::gather_tokens", "CUDA")
    assert STATUS.has_cuda or "without CUDA" in (STATUS.reason or "")


def test_missing_extension_warns_with_build_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "random_ltd._C", None)  # makes `import random_ltd._C` raise ImportError
    monkeypatch.setenv("RANDOM_LTD_NO_JIT", "1")
    monkeypatch.setattr(_extension, "_status", None)
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation -e ."):
        status = _extension.load()
    assert not status.loaded and status.source is None
    assert "RANDOM_LTD_NO_JIT" in status.reason
    assert _extension.load() is status  # cached: one warning per process


def test_jit_fallback_builds_and_loads(tmp_path: Path) -> None:
    """Without a prebuilt random_ltd._C the sources are JIT-compiled (in a fresh process: ops register once)."""
    code = (
        "import sys, torch; sys.modules['random_ltd._C'] = None\n"
        "from random_ltd.ops import _extension, reference as ref\n"
        "st = _extension.load(); assert st.loaded and st.source == 'jit', st\n"
        "out = torch.empty(2, 3, 17, dtype=torch.long)\n"
        "torch.ops.random_ltd.sample_sorted_indices_(out, 50, 9, 1, 0, 0)\n"
        "assert torch.equal(out, ref.sample_sorted_indices(2, 3, 50, 17, seed=9, step=1))\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("RANDOM_LTD_NO_JIT", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
