"""Contracts of the public token ops that fuzzing found broken (issue 13): index order, double backward, index
ranges of the position/mask ops, torch.compile, dtype sets, meta tensors, lazy extension loading.

Every expectation is against plain PyTorch (torch.gather / index_select), on every usable backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from random_ltd.ops import (
    gather_positions,
    gather_tokens,
    sample_sorted_indices,
    scatter_tokens,
    slice_attention_mask,
)
from random_ltd.ops.dispatch import PRIORITY, CpuBackend, CudaBackend, TorchBackend, select_backend

ROOT = Path(__file__).resolve().parents[2]


def torch_gather(x: torch.Tensor, idx: torch.Tensor, batch_first: bool) -> torch.Tensor:
    dim = 1 if batch_first else 0
    index = idx if batch_first else idx.t()
    return torch.gather(x, dim, index[..., None].expand(*index.shape, x.shape[-1]))


def torch_scatter(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, batch_first: bool) -> torch.Tensor:
    dim = 1 if batch_first else 0
    index = idx if batch_first else idx.t()
    return x.scatter(dim, index[..., None].expand(*index.shape, x.shape[-1]), y)


# ---------------------------------------------------------------- 1. index order and duplicates


@pytest.mark.parametrize("batch_first", [False, True], ids=["sbh", "bsh"])
@pytest.mark.parametrize("bad", [[[1, 1]], [[2, 1]], [[0, 3, 3]], [[4, 2, 3]]], ids=str)
def test_non_increasing_indices_rejected(backend_device, batch_first: bool, bad: list) -> None:
    """Strictly increasing per row is the contract: a repeated position would get an overwritten (wrong) grad."""
    backend, device = backend_device
    idx = torch.tensor(bad, device=device)
    x = torch.randn((1, 5, 3) if batch_first else (5, 1, 3), device=device)
    y = torch.randn((1, idx.shape[1], 3) if batch_first else (idx.shape[1], 1, 3), device=device)
    with pytest.raises(ValueError, match="indices must be strictly increasing"):
        gather_tokens(x, idx, batch_first=batch_first, backend=backend)
    with pytest.raises(ValueError, match="indices must be strictly increasing"):
        scatter_tokens(x, y, idx, batch_first=batch_first, backend=backend)


def test_duplicate_gradient_never_silently_wrong(backend_device) -> None:
    """The issue's example: the only accepted form of [[1, 1]] is none at all, so no grad of 1 where torch gives 2."""
    backend, device = backend_device
    x = torch.randn(1, 4, 2, device=device, requires_grad=True)
    with pytest.raises(ValueError):
        gather_tokens(x, torch.tensor([[1, 1]], device=device), batch_first=True, backend=backend)


@pytest.mark.parametrize("fn", ["gather", "scatter"])
def test_out_of_range_indices_value_error(backend_device, fn: str) -> None:
    backend, device = backend_device
    x = torch.randn(5, 2, 3, device=device)
    for bad in ([[0, 5], [1, 2]], [[-1, 2], [1, 2]]):
        idx = torch.tensor(bad, device=device)
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
            if fn == "gather":
                gather_tokens(x, idx, batch_first=False, backend=backend)
            else:
                scatter_tokens(x, torch.zeros(2, 2, 3, device=device), idx, batch_first=False, backend=backend)


# ---------------------------------------------------------------- 2. double backward


def _f64(shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()


@pytest.mark.parametrize("batch_first", [False, True], ids=["sbh", "bsh"])
def test_gradgradcheck_gather_scatter_pair(backend_device, batch_first: bool) -> None:
    """Second derivatives match finite differences on every backend (they were silently zero on cpu)."""
    backend, device = backend_device
    b, s, k, h = 2, 7, 3, 2
    idx = sample_sorted_indices(1, b, s, k, seed=4, device=device)[0]
    x = _f64((b, s, h) if batch_first else (s, b, h), device, 0)
    y = _f64((b, k, h) if batch_first else (k, b, h), device, 1)

    def gather(t):
        return gather_tokens(t, idx, batch_first=batch_first, backend=backend)

    def scatter(a, c):
        return scatter_tokens(a, c, idx, batch_first=batch_first, backend=backend)

    # squares make the second derivative non-trivial (a linear op alone has a zero Hessian)
    def pair(a, c):
        return scatter(a * a, gather(a) * c) ** 2

    assert torch.autograd.gradgradcheck(lambda t: gather(t) ** 2, (x,))
    assert torch.autograd.gradgradcheck(lambda a, c: scatter(a, c) ** 2, (x, y))
    assert torch.autograd.gradgradcheck(pair, (x, y))


def test_double_backward_not_zero(backend_device) -> None:
    """The grad of the grad is the plain-torch one (it used to be zeros on the cpu backend)."""
    backend, device = backend_device
    idx = torch.tensor([[0, 2, 3]], device=device)
    x = torch.randn(1, 5, 1, dtype=torch.float64, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad((gather_tokens(x, idx, batch_first=True, backend=backend) ** 3).sum(), x,
                               create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    (g2,) = torch.autograd.grad((torch_gather(x2, idx, True) ** 3).sum(), x2, create_graph=True)
    (gg2,) = torch.autograd.grad(g2.sum(), x2)
    assert torch.equal(gg, gg2) and bool(gg.abs().sum() > 0)


# ---------------------------------------------------------------- 4. gather_positions ranges


@pytest.mark.parametrize("form", ["ids1d", "ids2d", "cos3d", "rotary"])
@pytest.mark.parametrize("bad", [[[-1, 2]], [[1, 10]]], ids=["negative", "too-large"])
def test_gather_positions_rejects_out_of_range(form: str, bad: list) -> None:
    s = 10
    pos = {"ids1d": torch.arange(s), "ids2d": torch.arange(s)[None], "cos3d": torch.randn(1, s, 4),
           "rotary": torch.randn(s, 1, 1, 4)}[form]
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        gather_positions(pos, torch.tensor(bad))


def test_gather_positions_valid_matches_indexing() -> None:
    idx = torch.tensor([[0, 3, 9]])
    assert torch.equal(gather_positions(torch.arange(10) * 2, idx), torch.tensor([[0, 6, 18]]))
    table = torch.randn(10, 1, 1, 4)
    assert torch.equal(gather_positions(table, idx), table[idx.t()].squeeze(2))


# ---------------------------------------------------------------- 5. slice_attention_mask index values


@pytest.mark.parametrize("form", ["pad2d", "hf4d", "square4d"])
@pytest.mark.parametrize("bad", [[[-1, 2]], [[1, 8]]], ids=["negative", "too-large"])
def test_slice_attention_mask_rejects_out_of_range(backend_device, form: str, bad: list) -> None:
    backend, device = backend_device
    s = 8
    mask = {"pad2d": torch.ones(1, s, dtype=torch.bool), "hf4d": torch.zeros(1, 1, 1, s),
            "square4d": torch.ones(s, s, dtype=torch.bool).tril()[None, None]}[form].to(device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANDOM_LTD_BACKEND", backend.NAME)
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 8\)"):
            slice_attention_mask(mask, torch.tensor(bad, device=device))


def test_slice_attention_mask_0d_mask() -> None:
    with pytest.raises(ValueError, match="mask must be"):
        slice_attention_mask(torch.tensor(True), torch.tensor([[0]]))


def test_slice_attention_mask_unsorted_allowed(backend_device) -> None:
    """Masks only need indices in range (unsorted is fine: nothing is differentiated through the indices)."""
    backend, device = backend_device
    mask = torch.randn(1, 2, 6, 6, device=device)
    idx = torch.tensor([[4, 1, 2]], device=device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANDOM_LTD_BACKEND", backend.NAME)
        got = slice_attention_mask(mask, idx)
    assert torch.equal(got, mask[:, :, idx[0]][:, :, :, idx[0]])


# ---------------------------------------------------------------- 16. one dtype set for every backend


ALL_COPY_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                   torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
                   torch.complex32, torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2,
                   torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu, torch.float4_e2m1fn_x2]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _random_bits(shape, dtype, gen) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    n = torch.empty(shape, dtype=dtype).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).view(shape)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", ALL_COPY_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_every_backend_copies_every_dtype(backend_device, dtype: torch.dtype) -> None:
    """Bit-exact on random bit patterns (NaN payloads included), compared with index_select on the raw bytes."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(1)
    x = _random_bits((9, 2, 3), dtype, gen)
    idx = torch.tensor([[0, 4, 8], [1, 2, 7]])
    y = _random_bits((3, 2, 3), dtype, gen)
    g = gather_tokens(x.to(device), idx.to(device), batch_first=False, backend=backend).cpu()
    xb = _bits(x).view(9, 2, -1)
    expected = torch.stack([xb[idx[i], i] for i in range(2)], dim=1)
    assert g.dtype == dtype and torch.equal(_bits(g).view(3, 2, -1), expected)
    out = scatter_tokens(x.to(device), y.to(device), idx.to(device), batch_first=False, backend=backend).cpu()
    expected = xb.clone()
    for i in range(2):
        expected[idx[i], i] = _bits(y).view(3, 2, -1)[:, i]
    assert out.dtype == dtype and torch.equal(_bits(out).view(9, 2, -1), expected)


@pytest.mark.parametrize("dtype", [torch.bits8, torch.bits16, torch.uint3, torch.int5], ids=str)
def test_unsupported_dtype_same_error_everywhere(backend_device, dtype: torch.dtype) -> None:
    backend, device = backend_device
    x = torch.zeros(4, 1, 2 * dtype.itemsize, dtype=torch.uint8).view(dtype).to(device)
    with pytest.raises(TypeError, match="x has dtype .* which the token ops do not copy"):
        gather_tokens(x, torch.tensor([[0, 2]], device=device), batch_first=False, backend=backend)


def test_dtype_sets_agree_with_the_extension() -> None:
    """The Python dtype set (dispatch.COPYABLE_DTYPES) is the C++ one: every torch dtype accepted by one is by both."""
    from random_ltd.ops import _extension
    from random_ltd.ops.dispatch import COPYABLE_DTYPES

    if not _extension.load().loaded:
        pytest.skip("extension not built")
    dtypes = {d for d in vars(torch).values() if isinstance(d, torch.dtype)}
    quantized = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
    assert not quantized & COPYABLE_DTYPES  # they dispatch to QuantizedCPU, never to our kernels
    checked = 0
    for dtype in dtypes - quantized:
        try:
            x = torch.zeros(3, 1, 16, dtype=torch.uint8).view(dtype)
        except RuntimeError:  # a dtype no tensor can be viewed as (none in torch 2.13)
            continue
        try:
            torch.ops.random_ltd.gather_tokens(x, torch.tensor([[0]]), False)
            accepted_cpp = True
        except RuntimeError as exc:
            assert "unsupported dtype" in str(exc)
            accepted_cpp = False
        assert accepted_cpp == (dtype in COPYABLE_DTYPES), dtype
        checked += 1
    assert checked >= len(COPYABLE_DTYPES)


# ---------------------------------------------------------------- 17. meta tensors, lazy loading, forced backends


@pytest.mark.parametrize("batch_first", [False, True], ids=["sbh", "bsh"])
def test_meta_tensors(batch_first: bool) -> None:
    x = torch.empty((2, 10, 4) if batch_first else (10, 2, 4), device="meta")
    idx = torch.empty(2, 3, dtype=torch.int64, device="meta")
    g = gather_tokens(x, idx, batch_first=batch_first)
    assert g.device.type == "meta" and g.shape == ((2, 3, 4) if batch_first else (3, 2, 4))
    assert scatter_tokens(x, g, idx, batch_first=batch_first).shape == x.shape
    mask = torch.empty(2, 1, 10, 10, device="meta", dtype=torch.bool)
    assert slice_attention_mask(mask, idx).shape == (2, 1, 3, 3)
    assert gather_positions(torch.empty(10, 1, 1, 8, device="meta"), idx).shape == (3, 2, 1, 8)


def test_forced_cpu_backend_in_fresh_process() -> None:
    code = (
        "import torch\n"
        "from random_ltd.ops import gather_tokens, scatter_tokens\n"
        "from random_ltd.ops.dispatch import CpuBackend\n"
        "x = torch.randn(6, 2, 3); idx = torch.tensor([[0, 4], [1, 5]])\n"
        "g = gather_tokens(x, idx, batch_first=False, backend=CpuBackend())\n"
        "assert torch.equal(g, torch.stack([x[idx[i], i] for i in range(2)], 1))\n"
        "scatter_tokens(x, g, idx, batch_first=False, backend=CpuBackend())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), RANDOM_LTD_NO_JIT="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    if "random_ltd._C not importable" in proc.stderr:
        pytest.skip("extension not built")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_forced_backend_that_cannot_run_says_why() -> None:
    with pytest.raises(RuntimeError, match="backend cuda cannot run on cpu"):
        gather_tokens(torch.randn(4, 1, 2), torch.tensor([[0, 1]]), batch_first=False, backend=CudaBackend())


# ---------------------------------------------------------------- 17.2 (issue 17): backend chosen once, cheap


def test_backend_selection_cached_and_env_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    for be in PRIORITY:
        original = type(be).not_supported_reasons
        monkeypatch.setattr(type(be), "not_supported_reasons",
                            lambda self, *a, _o=original, **k: calls.append(self.NAME) or _o(self, *a, **k))
    from random_ltd.ops import dispatch

    monkeypatch.setattr(dispatch, "_SELECTED", {})
    monkeypatch.delenv("RANDOM_LTD_BACKEND", raising=False)
    first = select_backend("cpu", torch.float32)
    n = len(calls)
    assert n > 0
    for _ in range(5):
        assert select_backend("cpu", torch.float32) is first
        assert select_backend(torch.device("cpu"), torch.float32) is first
    assert len(calls) == n, "selection is recomputed on every call"
    monkeypatch.setenv("RANDOM_LTD_BACKEND", "torch")
    assert isinstance(select_backend("cpu", torch.float32), TorchBackend)
    monkeypatch.delenv("RANDOM_LTD_BACKEND")
    assert select_backend("cpu", torch.float32) is first


def test_torch_backend_uses_flat_row_index_ops() -> None:
    """The fallback moves rows with index_select / index_copy_ (no torch.gather with expanded indices)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    x = torch.randn(6, 2, 3, requires_grad=True)
    idx = torch.tensor([[0, 4], [1, 5]])
    with Log() as log:
        g = gather_tokens(x, idx, batch_first=False, backend=TorchBackend(), check_indices=False)
        scatter_tokens(x, g, idx, batch_first=False, backend=TorchBackend(), check_indices=False).sum().backward()
    assert "gather" not in log.ops and "scatter" not in log.ops, log.ops
    assert "index_select" in log.ops and any(op.startswith("index_copy") for op in log.ops), log.ops


# ---------------------------------------------------------------- 14. torch.compile(fullgraph=True)


def _compile_case(backend_name: str, compile_backend: str) -> None:
    torch._dynamo.reset()
    be = {b.NAME: b for b in PRIORITY}[backend_name]

    def step(x, y, idx, mask, pos):
        g = gather_tokens(x, idx, batch_first=True)
        out = scatter_tokens(x, g * y, idx, batch_first=True)
        return out, slice_attention_mask(mask, idx), gather_positions(pos, idx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANDOM_LTD_BACKEND", be.NAME)
        compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
        x = torch.randn(2, 6, 3, requires_grad=True)
        y = torch.randn(2, 3, 3, requires_grad=True)
        idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
        mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
        pos = torch.randn(6, 1, 1, 4)
        out, m, p = compiled(x, y, idx, mask, pos)
        x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        ref = torch_scatter(x2, torch_gather(x2, idx, True) * y2, idx, True)
        assert torch.equal(out, ref)
        assert torch.equal(m, torch.stack([mask[0][:, i][:, :, i] for i in idx]))
        assert torch.equal(p, pos[idx.t()].squeeze(2))
        if compile_backend != "inductor":  # one backward suffices; inductor's backward compile is slow on CPU
            out.sum().backward()
            ref.sum().backward()
            assert torch.equal(x.grad, x2.grad) and torch.equal(y.grad, y2.grad)
        with pytest.raises((ValueError, RuntimeError)):  # a compiled check still refuses bad indices
            compiled(x, y, torch.tensor([[0, 2, 6], [1, 3, 4]]), mask, pos)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("backend_name", [b.NAME for b in PRIORITY if not b.not_supported_reasons(torch.device("cpu"))])
def test_torch_compile_fullgraph(backend_name: str, compile_backend: str) -> None:
    _compile_case(backend_name, compile_backend)


def test_cpu_backend_is_the_default_here() -> None:
    """Guards the compile test above: it must cover the compiled cpu backend, not only the torch reference."""
    if CpuBackend().not_supported_reasons(torch.device("cpu")):
        pytest.skip("extension not built")
    assert select_backend("cpu").NAME == "cpu"


def test_fake_tensor_mode() -> None:
    """Shape propagation under FakeTensorMode (memory planners, tracing tools): no value check on fake data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(10, 2, 4)
        idx = torch.tensor([[0, 3], [1, 9]])
        g = gather_tokens(x, idx, batch_first=False)
        assert g.shape == (2, 2, 4)
        assert scatter_tokens(x, g, idx, batch_first=False).shape == x.shape


def test_torch_compile_with_an_explicit_backend() -> None:
    """backend= passed explicitly is checked outside the traced region too (no extension load under trace)."""
    torch._dynamo.reset()
    be = next(b for b in PRIORITY if not b.not_supported_reasons(torch.device("cpu")))
    f = torch.compile(lambda x, i: gather_tokens(x, i, batch_first=False, backend=be), fullgraph=True,
                      backend="aot_eager")
    x = torch.randn(6, 2, 3, requires_grad=True)
    idx = torch.tensor([[0, 4], [1, 5]])
    f(x, idx).sum().backward()
    assert torch.equal(x.grad, torch_scatter(torch.zeros(6, 2, 3), torch.ones(2, 2, 3), idx, False))
