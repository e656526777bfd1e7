"""The fused token_drop -> layer -> token_combine path (issue 17 item 1) against autograd through the unfused ops."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from random_ltd.ops import (
    DroppedTokens,
    gather_tokens,
    sample_sorted_indices,
    scatter_tokens,
    token_combine,
    token_drop,
)

LAYOUTS = [pytest.param(False, id="sbh"), pytest.param(True, id="bsh")]


def _layer(h: int, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(h, 2 * h), torch.nn.Tanh(), torch.nn.Linear(2 * h, h)).to(dtype)


def _setup(batch_first: bool, device: str, dtype=torch.float32, b=3, s=23, k=9, h=5):
    idx = sample_sorted_indices(1, b, s, k, seed=3, device=device)[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((b, s, h) if batch_first else (s, b, h), generator=gen, dtype=torch.float64).to(dtype).to(device)
    return x, idx


def _unfused(x, idx, layer, batch_first, backend):
    kept = gather_tokens(x, idx, batch_first=batch_first, backend=backend)
    return scatter_tokens(x, layer(kept), idx, batch_first=batch_first, backend=backend)


def _fused(x, idx, layer, batch_first, backend):
    kept, dropped = token_drop(x, idx, batch_first=batch_first, backend=backend)
    return token_combine(dropped, layer(kept))


@pytest.mark.parametrize("batch_first", LAYOUTS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fused_equals_unfused_exactly(backend_device, batch_first: bool, residual: bool) -> None:
    """fp32: forward, x's gradient and the layer's parameter gradients are bitwise those of the unfused ops."""
    backend, device = backend_device
    x, idx = _setup(batch_first, device)
    layer = _layer(x.shape[-1]).to(device)
    grads = []
    for fn in (_fused, _unfused):
        xr = x.clone().requires_grad_()
        layer.zero_grad()
        out = fn(xr, idx, layer, batch_first, backend)
        if residual:  # x also used outside the layer: its gradients accumulate with the fused one
            out = out * 2 + xr.sin()
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device))
        grads.append((out.detach(), xr.grad, [p.grad.clone() for p in layer.parameters()]))
    (o1, g1, p1), (o2, g2, p2) = grads
    assert torch.equal(o1, o2) and torch.equal(g1, g2)
    assert all(torch.equal(a, c) for a, c in zip(p1, p2))


@pytest.mark.parametrize("batch_first", LAYOUTS)
def test_layer_ignoring_its_input_gives_zero_kept_rows(backend_device, batch_first: bool) -> None:
    backend, device = backend_device
    x, idx = _setup(batch_first, device)
    const = torch.randn(gather_tokens(x, idx, batch_first=batch_first).shape, device=device, requires_grad=True)
    xr = x.clone().requires_grad_()
    _, dropped = token_drop(xr, idx, batch_first=batch_first, backend=backend)
    token_combine(dropped, const * 3).sum().backward()
    expected = scatter_tokens(torch.ones_like(x), torch.zeros_like(const), idx, batch_first=batch_first)
    assert torch.equal(xr.grad, expected)
    assert torch.equal(const.grad, torch.full_like(const, 3.0))


@pytest.mark.parametrize("batch_first", LAYOUTS)
def test_kept_without_combine_is_the_gather_gradient(backend_device, batch_first: bool) -> None:
    backend, device = backend_device
    x, idx = _setup(batch_first, device)
    xr, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    kept, _ = token_drop(xr, idx, batch_first=batch_first, backend=backend)
    (kept * 2).sum().backward()
    (gather_tokens(x2, idx, batch_first=batch_first) * 2).sum().backward()
    assert torch.equal(xr.grad, x2.grad)


def test_combine_twice_is_exact(backend_device) -> None:
    backend, device = backend_device
    x, idx = _setup(False, device)
    l1, l2 = _layer(5).to(device), torch.nn.Linear(5, 5).to(device)
    xr, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    kept, dropped = token_drop(xr, idx, batch_first=False, backend=backend)
    (token_combine(dropped, l1(kept)) * 2 + token_combine(dropped, l2(kept)).cos()).sum().backward()
    k2 = gather_tokens(x2, idx, batch_first=False)
    (scatter_tokens(x2, l1(k2), idx, batch_first=False) * 2
     + scatter_tokens(x2, l2(k2), idx, batch_first=False).cos()).sum().backward()
    assert torch.allclose(xr.grad, x2.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_first", LAYOUTS)
def test_gradcheck_and_gradgradcheck_fp64(backend_device, batch_first: bool) -> None:
    backend, device = backend_device
    x, idx = _setup(batch_first, device, torch.float64, b=2, s=7, k=3, h=2)
    layer = _layer(2, torch.float64).to(device)

    def f(t):
        return _fused(t, idx, layer, batch_first, backend) ** 2

    xr = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (xr,))
    assert torch.autograd.gradgradcheck(f, (xr,))


def test_autocast_dtype_follows_the_layer(backend_device) -> None:
    """A layer returning another dtype (autocast): the result has the layer's dtype, as scatter(x.to(dtype), ...)."""
    backend, device = backend_device
    x, idx = _setup(True, device)
    layer = _layer(5).to(device)
    xr, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    kept, dropped = token_drop(xr, idx, batch_first=True, backend=backend)
    out = token_combine(dropped, layer(kept).to(torch.bfloat16))
    k2 = gather_tokens(x2, idx, batch_first=True)
    ref = scatter_tokens(x2.to(torch.bfloat16), layer(k2).to(torch.bfloat16), idx, batch_first=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(device)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(xr.grad, x2.grad)


def test_no_grad_forward(backend_device) -> None:
    backend, device = backend_device
    x, idx = _setup(False, device)
    layer = _layer(5).to(device)
    with torch.no_grad():
        assert torch.equal(_fused(x, idx, layer, False, backend), _unfused(x, idx, layer, False, backend))


def test_x_is_not_copied_nor_modified(backend_device) -> None:
    backend, device = backend_device
    x, idx = _setup(False, device)
    xr = x.clone().requires_grad_()
    before = xr.detach().clone()
    kept, dropped = token_drop(xr, idx, batch_first=False, backend=backend)
    assert dropped._carrier.data_ptr() == xr.data_ptr()  # an alias
    out = token_combine(dropped, kept * 0)
    assert out.data_ptr() != xr.data_ptr() and torch.equal(xr.detach(), before)


def test_misuse_is_refused() -> None:
    x, idx = _setup(False, "cpu")
    kept, dropped = token_drop(x, idx, batch_first=False)
    with pytest.raises(TypeError, match="DroppedTokens returned by token_drop"):
        token_combine(x, kept)  # a plain tensor as carrier
    with pytest.raises(TypeError, match="created by random_ltd.ops.token_drop only"):
        DroppedTokens(object(), x, idx, False, None)
    with pytest.raises(ValueError, match="layer_out must have shape"):
        token_combine(dropped, kept[:-1])
    with pytest.raises(ValueError, match="indices must be strictly increasing"):
        token_drop(x, idx.flip(1), batch_first=False)


def test_backward_is_one_full_size_pass() -> None:
    """The fused backward writes x's gradient with one full-size op: no zero fill, no full-size add or copy."""
    x, idx = _setup(False, "cpu", s=64, k=8, h=16)
    layer = _layer(16)
    full = x.numel()

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.full_size = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.numel() == full and \
                    out.untyped_storage().data_ptr() not in inputs:  # views (detach, ...) move no memory
                self.full_size.append(func.__name__)
            return out

    for fn, at_most in ((_fused, 1), (_unfused, 4)):
        xr = x.clone().requires_grad_()
        out = fn(xr, idx, layer, False, None)
        g = torch.randn_like(out)
        with Log() as log:
            out.backward(g)
        assert len(log.full_size) <= at_most, log.full_size
        if fn is _unfused:
            assert len(log.full_size) > 1, log.full_size  # the test can tell the two apart


def test_wrapped_layer_gradient_equals_unfused_ops() -> None:
    """RandomLTDLayer (now on the fused pair): input and parameter gradients bitwise those of the unfused ops."""
    import copy
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "layers"))
    from tiny_models import Block, TinyGPT

    from random_ltd.config import RandomLTDConfig
    from random_ltd.layers import convert_to_random_ltd

    torch.manual_seed(0)
    model = TinyGPT(layers=4)
    ref_layer = copy.deepcopy(model.layers[1])
    config = RandomLTDConfig.model_validate({
        "enabled": True, "total_layer_num": 4, "hidden_state_order": "batch_seq_dim",
        "random_ltd_schedule": {"min_value": 4, "max_value": 32, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 10, "seq_per_step": 4}}})
    state = convert_to_random_ltd(model, Block, config)
    state.advance(0, {1: 5, 2: 5})
    b, s = 3, 12
    x = torch.randn(b, s, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    mask = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s)
    pos = torch.arange(s).expand(b, s)
    state.begin_micro_batch()
    out = model.layers[1](x, attention_mask=mask, position_ids=pos)
    idx = state.indices(1, b, s, 5, x.device)
    sub_mask = torch.ones(5, 5, dtype=torch.bool).triu(1).expand(b, 1, 5, 5)
    kept = gather_tokens(x2, idx, batch_first=True)
    expected = scatter_tokens(x2, ref_layer(kept, attention_mask=sub_mask, position_ids=idx), idx, batch_first=True)
    assert torch.equal(out, expected)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * g).sum().backward()
    (expected * g).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    for p, q in zip(model.layers[1].parameters(), ref_layer.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_fused_under_torch_compile(compile_backend: str) -> None:
    torch._dynamo.reset()
    x, idx = _setup(False, "cpu", b=2, s=7, k=3, h=3)
    layer = _layer(3)
    xr, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(lambda t: _fused(t, idx, layer, False, None), fullgraph=True, backend=compile_backend)
    out = compiled(xr)
    ref = _unfused(x2, idx, layer, False, None)
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(xr.grad, x2.grad)


def test_fused_saves_only_indices(backend_device) -> None:
    """No activation-sized tensor is kept for backward by the pair itself: only the int64 indices."""
    backend, device = backend_device
    x, idx = _setup(False, device, s=64, k=8, h=32)
    xr = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kept, dropped = token_drop(xr, idx, batch_first=False, backend=backend)
        token_combine(dropped, kept.detach() * 2)
    assert saved and all(t.dtype == torch.int64 and t.shape == idx.shape for t in saved)
