"""The CUDA kernels (csrc/cuda via torch.ops.random_ltd.*) against random_ltd/ops/reference.py, bit for bit.

The same checks as tests/ops/test_extension.py, on CUDA tensors, plus what only matters on the GPU: every vector
path of the row copy (16/8/4-byte and scalar, chosen per row from the address phase), offsets beyond 2^31 elements,
no host synchronisation, CUDA-graph capture, side streams, and out-of-range indices that must not fault.
Skipped cleanly on machines without a GPU or without a CUDA build of the extension.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from kernel_cases import (
    DTYPES,
    GATHER_CASES,
    LAYOUTS,
    SAMPLER_CASES,
    as_int,
    assert_bitwise_equal,
    random_indices,
    random_tensor,
    reference_slice,
    sampler_case_id,
)

from random_ltd.ops import _extension
from random_ltd.ops import reference as ref

if torch.cuda.is_available():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        STATUS = _extension.load()
    SKIP_REASON = None if STATUS.has_cuda else f"random_ltd extension has no CUDA kernels: {STATUS.reason}"
else:
    STATUS = None
    SKIP_REASON = "no CUDA device (torch.cuda.is_available() is False)"

pytestmark = [
    pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""),
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental"),
]

ops = torch.ops.random_ltd
DEV = "cuda"


def check_gather_scatter(x: torch.Tensor, idx: torch.Tensor, batch_first: bool, gen: torch.Generator) -> None:
    """x, idx on CPU; the ops run on CUDA copies (or on x itself when it already lives there)."""
    xd = x if x.is_cuda else x.to(DEV)
    xc = xd.cpu()
    idx_d = idx.to(DEV)
    g = ops.gather_tokens(xd, idx_d, batch_first)
    assert g.is_cuda
    assert_bitwise_equal(as_int(g), ref.gather_tokens(as_int(xc), idx, batch_first))
    y = random_tensor(tuple(g.shape), x.dtype, gen)
    out = ops.scatter_tokens(xd, y.to(DEV), idx_d, batch_first)
    assert_bitwise_equal(as_int(out), ref.scatter_tokens(as_int(xc), as_int(y), idx, batch_first))
    assert torch.equal(as_int(xd).cpu(), as_int(xc)), "scatter_tokens must be out of place"


@pytest.mark.parametrize("batch_first", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("s,k,h", GATHER_CASES)
def test_gather_scatter_bitwise(s: int, k: int, h: int, dtype: torch.dtype, batch_first: bool) -> None:
    gen = torch.Generator().manual_seed(s * 7919 + k * 31 + h)
    b = 2
    x = random_tensor((b, s, h) if batch_first else (s, b, h), dtype, gen)
    check_gather_scatter(x, random_indices(b, s, k, gen), batch_first, gen)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64, torch.complex32, torch.int64, torch.uint8,
                                   torch.int16, torch.float8_e4m3fn, torch.uint16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_gather_scatter_other_dtypes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    check_gather_scatter(random_tensor((33, 3, 5), dtype, gen), random_indices(3, 33, 9, gen), False, gen)


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 5, 8], ids=lambda o: f"off{o}")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("h", [1, 3, 8, 13, 64, 1000], ids=lambda h: f"h{h}")
def test_misaligned_rows_take_every_vector_path(offset: int, dtype: torch.dtype, h: int) -> None:
    """x starts `offset` elements into a buffer, so source and destination rows differ in their address phase
    modulo 16 and each row picks the 16-, 8-, 4-byte or scalar path."""
    gen = torch.Generator().manual_seed(offset * 100 + h)
    s, b, k = 50, 3, 21
    buf = random_tensor((offset + s * b * h,), dtype, gen).to(DEV)
    x = buf[offset:].view(s, b, h)
    assert x.is_contiguous()
    for batch_first in (False, True):
        check_gather_scatter(x if not batch_first else x.view(b, s, h), random_indices(b, s, k, gen), batch_first,
                             gen)


@pytest.mark.parametrize("batch_first", LAYOUTS)
def test_gather_scatter_long_sequence(batch_first: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    s, b, k, h = 32768, 2, 4096, 1024
    x = random_tensor((b, s, h) if batch_first else (s, b, h), torch.bfloat16, gen)
    check_gather_scatter(x, ref.sample_sorted_indices(1, b, s, k, seed=11)[0], batch_first, gen)


def test_offsets_beyond_int32() -> None:
    """Rows past element 2^31 are addressed with 64-bit offsets (DeepSpeed's kernels use 32-bit ones)."""
    free, _ = torch.cuda.mem_get_info()
    s, b, h = 2**21 + 64, 1, 1024  # 2^31 + 65536 int8 elements
    if free < 3 * s * h:
        pytest.skip(f"needs ~{3 * s * h / 2**30:.1f} GiB free on the GPU")
    x = torch.empty(s, b, h, dtype=torch.int8, device=DEV)
    x.view(-1)[: 2**20].random_(-128, 127)
    rows = torch.arange(s, device=DEV, dtype=torch.int64)
    x[:, 0, :8] = (rows % 251).to(torch.int8).unsqueeze(1)  # row signature in the first 8 bytes
    x[-64:].random_(-128, 127)
    idx = torch.tensor([[0, 5, 2**21 - 1, 2**21, s - 2, s - 1]], device=DEV)
    g = ops.gather_tokens(x, idx, False)
    assert torch.equal(g[:, 0], x[idx[0], 0])
    y = torch.randint(-128, 127, g.shape, dtype=torch.int8, device=DEV)
    out = ops.scatter_tokens(x, y, idx, False)
    assert torch.equal(out[idx[0], 0], y[:, 0])
    out[idx[0], 0] = x[idx[0], 0]
    assert torch.equal(out, x)


# --------------------------------------------------------------------------------------------------------------
# gather_tokens_backward: the gradient of gather in one pass (zero rows and grad rows, each written once)

needs_backward_op = pytest.mark.skipif(
    SKIP_REASON is None and not hasattr(ops, "gather_tokens_backward"),
    reason="torch.ops.random_ltd.gather_tokens_backward is not registered in this build")


def expected_gather_backward(grad: torch.Tensor, idx: torch.Tensor, seq_len: int, batch_first: bool) -> torch.Tensor:
    """Zeros of x's shape with the kept rows taken from grad (integer view of the bytes), on the CPU."""
    g = as_int(grad.cpu())
    b, h = (g.shape[0], g.shape[2]) if batch_first else (g.shape[1], g.shape[2])
    zeros = torch.zeros((b, seq_len, h) if batch_first else (seq_len, b, h), dtype=g.dtype)
    return ref.scatter_tokens(zeros, g, idx.cpu(), batch_first)


def poison_allocator(nbytes: int) -> None:
    """Leaves a freed block of 0xFF bytes in the caching allocator: rows the kernel does not write would show it."""
    torch.full((nbytes + 4096,), 255, dtype=torch.uint8, device=DEV)
    torch.cuda.synchronize()


@needs_backward_op
@pytest.mark.parametrize("batch_first", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("s,k,h", GATHER_CASES)
def test_gather_tokens_backward_bitwise(s: int, k: int, h: int, dtype: torch.dtype, batch_first: bool) -> None:
    gen = torch.Generator().manual_seed(s * 104729 + k * 17 + h)
    b = 2
    idx = random_indices(b, s, k, gen)
    grad = random_tensor((b, k, h) if batch_first else (k, b, h), dtype, gen).to(DEV)
    poison_allocator(b * s * h * grad.element_size())
    out = ops.gather_tokens_backward(grad, idx.to(DEV), s, batch_first)
    assert_bitwise_equal(as_int(out), expected_gather_backward(grad, idx, s, batch_first))


@needs_backward_op
@pytest.mark.parametrize("offset", [0, 1, 3, 8], ids=lambda o: f"off{o}")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.complex128],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_gather_tokens_backward_misaligned_grad(offset: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(offset + 5)
    s, b, k, h = 40, 3, 17, 13
    buf = random_tensor((offset + k * b * h,), dtype, gen).to(DEV)
    grad = buf[offset:].view(k, b, h)
    idx = random_indices(b, s, k, gen)
    out = ops.gather_tokens_backward(grad, idx.to(DEV), s, False)
    assert_bitwise_equal(as_int(out), expected_gather_backward(grad, idx, s, False))


@needs_backward_op
def test_gather_tokens_backward_is_the_gradient_of_gather() -> None:
    x = torch.randn(64, 3, 16, device=DEV, requires_grad=True)
    idx = ref.sample_sorted_indices(1, 3, 64, 20, seed=3)[0].to(DEV)
    g = torch.randn(20, 3, 16, device=DEV)
    (ref.gather_tokens(x, idx, False) * g).sum().backward()
    assert torch.equal(ops.gather_tokens_backward(g, idx, 64, False), x.grad)


@needs_backward_op
def test_gather_tokens_backward_out_of_range_ignored_and_opcheck() -> None:
    g = torch.randn(2, 2, 8, device=DEV)
    idx = torch.tensor([[1, 10], [-1, 3]], device=DEV)
    out = ops.gather_tokens_backward(g, idx, 10, False)
    expected = torch.zeros(10, 2, 8, device=DEV)
    expected[1, 0] = g[0, 0]
    expected[3, 1] = g[1, 1]
    assert torch.equal(out, expected)
    gen = torch.Generator().manual_seed(0)
    good = random_indices(3, 20, 5, gen).to(DEV)
    torch.library.opcheck(ops.gather_tokens_backward.default, (torch.randn(5, 3, 8, device=DEV), good, 20, False))


# --------------------------------------------------------------------------------------------------------------
# Sampler

# CUDA-only extras: a large batch of rows and a sequence beyond the shared-memory path
CUDA_SAMPLER_CASES = [*SAMPLER_CASES, (24, 16, 2048, 1024, 7, 123456, 2, 0), (1, 2, 200_000, 70_000, 8, 1, 0, 0)]


@pytest.mark.parametrize("case", CUDA_SAMPLER_CASES, ids=sampler_case_id)
def test_sampler_matches_reference(case: tuple[int, ...]) -> None:
    layers, batch, s, k, seed, step, mb, off = case
    out = torch.full((layers, batch, k), -1, dtype=torch.long, device=DEV)
    ops.sample_sorted_indices_(out, s, seed, step, mb, off)
    expected = ref.sample_sorted_indices(layers, batch, s, k, seed=seed, step=step, micro_batch=mb, layer_offset=off)
    assert torch.equal(out.cpu(), expected)


def find_threshold_tie(seq_len: int = 32768) -> tuple[int, int]:
    """(seed, keep) such that two positions share the keep-th smallest hash and only the lower one is kept."""
    for seed in range(200):
        h = ref.position_hashes(1, 1, seq_len, seed=seed)[0, 0]
        values, counts = torch.unique(h, return_counts=True)
        dup = values[counts > 1]
        if dup.numel():
            return seed, int((h < dup[0]).sum()) + 1
    raise AssertionError("no duplicated hash found")


def test_sampler_tie_at_threshold_keeps_lower_position() -> None:
    s = 32768
    seed, keep = find_threshold_tie(s)
    out = torch.empty(1, 1, keep, dtype=torch.long, device=DEV)
    ops.sample_sorted_indices_(out, s, seed, 0, 0, 0)
    assert torch.equal(out.cpu(), ref.sample_sorted_indices(1, 1, s, keep, seed=seed))


def test_sampler_matches_cpu_kernel_and_is_deterministic() -> None:
    cpu = torch.empty(6, 4, 300, dtype=torch.long)
    ops.sample_sorted_indices_(cpu, 1000, 3, 9, 1, 2)
    for _ in range(3):
        gpu = torch.empty(6, 4, 300, dtype=torch.long, device=DEV)
        ops.sample_sorted_indices_(gpu, 1000, 3, 9, 1, 2)
        assert torch.equal(gpu.cpu(), cpu)


# --------------------------------------------------------------------------------------------------------------
# Attention-mask slicing


@pytest.mark.parametrize("mb", [1, 3], ids=lambda m: f"mb{m}")
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("s,k", [(1, 1), (97, 1), (97, 40), (97, 97), (300, 123)])
def test_slice_attention_mask(mb: int, dtype: torch.dtype, s: int, k: int) -> None:
    gen = torch.Generator().manual_seed(s + k + mb)
    mask = random_tensor((mb, 2, s, s), dtype, gen)
    idx = random_indices(3, s, k, gen)
    got = ops.slice_attention_mask(mask.to(DEV), idx.to(DEV))
    assert_bitwise_equal(as_int(got), reference_slice(as_int(mask), idx))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float16, torch.float32, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("s,k,b,heads", [(2100, 1500, 2, 1), (3000, 2049, 1, 2), (257, 129, 5, 3)])
def test_slice_attention_mask_row_tiles(dtype: torch.dtype, s: int, k: int, b: int, heads: int) -> None:
    """Rows longer than one shared tile of column offsets (1024), odd row lengths (every 16-byte phase of the
    vector stores), several samples per block range; out-of-memory-order (unsorted) indices."""
    gen = torch.Generator().manual_seed(s * 3 + k)
    mask = random_tensor((b, heads, s, s), dtype, gen)
    idx = random_indices(b, s, k, gen)
    got = ops.slice_attention_mask(mask.to(DEV), idx.to(DEV))
    assert_bitwise_equal(as_int(got), reference_slice(as_int(mask), idx))


def test_slice_attention_mask_strided() -> None:
    gen = torch.Generator().manual_seed(3)
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    idx = random_indices(4, 64, 20, gen)
    expanded = causal.view(1, 1, 64, 64).expand(4, 3, 64, 64)
    assert_bitwise_equal(ops.slice_attention_mask(expanded.to(DEV), idx.to(DEV)), reference_slice(expanded, idx))
    transposed = random_tensor((4, 2, 64, 64), torch.float32, gen).transpose(2, 3)
    got = ops.slice_attention_mask(transposed.to(DEV).transpose(2, 3).contiguous().transpose(2, 3), idx.to(DEV))
    assert_bitwise_equal(as_int(got), reference_slice(as_int(transposed.contiguous()), idx))


# --------------------------------------------------------------------------------------------------------------
# GPU-only behaviour


def test_no_host_sync_and_side_stream() -> None:
    """The ops never synchronise the host (torch's sync debug mode would raise) and honour the current stream."""
    gen = torch.Generator().manual_seed(4)
    x = random_tensor((512, 4, 256), torch.bfloat16, gen).to(DEV)
    mask = torch.ones(1, 1, 512, 512, dtype=torch.bool, device=DEV).tril()
    expected_idx = ref.sample_sorted_indices(2, 4, 512, 100, seed=1, step=2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            idx = torch.empty(2, 4, 100, dtype=torch.long, device=DEV)
            ops.sample_sorted_indices_(idx, 512, 1, 2, 0, 0)
            g = ops.gather_tokens(x, idx[1], False)
            out = ops.scatter_tokens(x, g.neg(), idx[1], False)
            m = ops.slice_attention_mask(mask, idx[0])
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    stream.synchronize()
    assert torch.equal(idx.cpu(), expected_idx)
    assert torch.equal(g.cpu(), ref.gather_tokens(x.cpu(), expected_idx[1], False))
    assert torch.equal(out.cpu(), ref.scatter_tokens(x.cpu(), g.neg().cpu(), expected_idx[1], False))
    assert torch.equal(m.cpu(), reference_slice(mask.cpu(), expected_idx[0]))


def test_cuda_graph_capture() -> None:
    """Sampler, gather and scatter can be captured in a CUDA graph and replayed with new inputs."""
    x = torch.randn(256, 2, 64, device=DEV)
    idx = torch.empty(1, 2, 50, dtype=torch.long, device=DEV)
    ops.sample_sorted_indices_(idx, 256, 5, 0, 0, 0)  # warm-up outside the capture
    ops.scatter_tokens(x, ops.gather_tokens(x, idx[0], False), idx[0], False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sample_sorted_indices_(idx, 256, 5, 0, 0, 0)
        g = ops.gather_tokens(x, idx[0], False)
        out = ops.scatter_tokens(x, g * 2, idx[0], False)
    x.copy_(torch.randn_like(x))
    idx.zero_()
    graph.replay()
    torch.cuda.synchronize()
    expected_idx = ref.sample_sorted_indices(1, 2, 256, 50, seed=5)
    assert torch.equal(idx.cpu(), expected_idx)
    assert torch.equal(g.cpu(), ref.gather_tokens(x.cpu(), expected_idx[0], False))
    assert torch.equal(out.cpu(), ref.scatter_tokens(x.cpu(), g.cpu() * 2, expected_idx[0], False))


def test_out_of_range_indices_do_not_fault() -> None:
    """Index values are validated in Python, not on the device; bad ones must still never be dereferenced:
    gather writes a zero row, scatter ignores the entry, the mask slice writes zeros."""
    x = torch.randn(10, 2, 8, device=DEV)
    idx = torch.tensor([[1, 10], [-1, 3]], device=DEV)
    g = ops.gather_tokens(x, idx, False)
    out = ops.scatter_tokens(x, torch.ones(2, 2, 8, device=DEV), idx, False)
    m = ops.slice_attention_mask(torch.ones(1, 1, 10, 10, device=DEV), idx)
    torch.cuda.synchronize()
    assert torch.equal(g[0, 0], x[1, 0]) and torch.equal(g[1, 1], x[3, 1])
    assert not g[1, 0].any() and not g[0, 1].any()
    expected = x.clone()
    expected[1, 0] = 1
    expected[3, 1] = 1
    assert torch.equal(out, expected)
    assert m[0, 0, 0, 0] == 1 and not m[0, 0, 1].any() and not m[1, 0, 0].any()


# --------------------------------------------------------------------------------------------------------------
# opcheck and argument checks on CUDA tensors


def test_opcheck_all_ops() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, 8, device=DEV)
    idx = random_indices(3, 20, 5, gen).to(DEV)
    torch.library.opcheck(ops.gather_tokens.default, (x, idx, False))
    torch.library.opcheck(ops.scatter_tokens.default, (x, torch.randn(5, 3, 8, device=DEV), idx, False))
    torch.library.opcheck(ops.sample_sorted_indices_.default,
                          (torch.empty(2, 3, 10, dtype=torch.long, device=DEV), 50, 1, 2, 3, 4))
    torch.library.opcheck(ops.slice_attention_mask.default, (torch.randn(1, 2, 20, 20, device=DEV), idx))


def test_bad_arguments_raise_on_cuda() -> None:
    x = torch.randn(10, 2, 4, device=DEV)
    idx = torch.tensor([[0, 3], [1, 9]], device=DEV)
    with pytest.raises(RuntimeError, match="must be on the same device"):
        ops.gather_tokens(x, idx.cpu(), False)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        ops.gather_tokens(x, idx.int(), False)
    with pytest.raises(RuntimeError, match="y has dtype"):
        ops.scatter_tokens(x, torch.randn(2, 2, 4, device=DEV, dtype=torch.float64), idx, False)
    with pytest.raises(RuntimeError, match="out must be int64"):
        ops.sample_sorted_indices_(torch.empty(1, 2, 3, dtype=torch.int32, device=DEV), 10, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="mask batch 3"):
        ops.slice_attention_mask(torch.ones(3, 1, 10, 10, device=DEV), idx)
