"""SkipLayer: routers, efficient == dense masked reference, pass-through, full-context attention, aux loss, config."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from random_ltd.config import ConfigError, SkipLayerConfig
from random_ltd.layers.routers import ROUTER_KINDS, RouterOutput, SkipRouter, straight_through
from random_ltd.layers.skip_layer import (
    SkipLayer,
    SkipLayerOptions,
    TinyDecoder,
    TinyDecoderLayer,
    skip_layer_aux_loss,
    skip_layer_capacities,
    skip_layer_metrics,
)

D, HEADS = 16, 4
LEARNED = ("straight_through_gumbel", "sigmoid", "top1_softmax")


def make(router="straight_through_gumbel", implementation="efficient", seed=0, **kw) -> SkipLayer:
    torch.manual_seed(seed)
    opts = SkipLayerOptions(router=router, implementation=implementation, **kw)
    layer = SkipLayer(TinyDecoderLayer(D, HEADS), opts)
    if layer.router.proj is not None:  # larger W_G so that decisions are not all near ties
        torch.nn.init.normal_(layer.router.proj.weight, std=0.5)
    return layer


def run_pair(router, b, t, group_size=None, seed=0, mask=None, dtype=torch.float32):
    """Efficient and dense layers with equal weights, same input and same router noise; outputs and grads."""
    eff = make(router, "efficient", seed=seed, group_size=group_size).to(dtype)
    dense = copy.deepcopy(eff)
    object.__setattr__(dense, "options", SkipLayerOptions(router=router, implementation="dense",
                                                          group_size=group_size))
    dense.parts = dense.layer
    torch.manual_seed(seed + 1)
    x = torch.randn(b, t, D, dtype=dtype)
    w = torch.randn(b, t, D, dtype=dtype)
    results = []
    for layer in (eff, dense):
        xi = x.clone().requires_grad_(True)
        out = layer(xi, attention_mask=mask, generator=torch.Generator().manual_seed(seed + 2))
        ((out.float() * w.float()).sum() + skip_layer_aux_loss(layer)).backward()
        # a parameter no token reached (e.g. nothing routed) has no grad in one and zeros in the other
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                 for n, p in layer.named_parameters()}
        results.append((out.detach(), xi.grad.clone(), grads, layer.last_route.hard.detach().clone()))
    return x, results


# ---------------------------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LEARNED + ("random",))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hard_decisions_are_exactly_zero_or_one(kind, training):
    router = SkipRouter(D, kind, init_std=0.5).train(training)
    out = router(torch.randn(3, 29, D))
    assert out.hard.dtype == torch.float32
    assert torch.equal(out.hard, out.hard.round()) and set(out.hard.unique().tolist()) <= {0.0, 1.0}
    if out.skip_scale is not None and kind != "top1_softmax":
        assert torch.equal(out.routed_scale, out.hard) and torch.equal(out.skip_scale, 1.0 - out.hard)


@pytest.mark.parametrize("kind", LEARNED)
def test_eval_decisions_are_deterministic_argmax(kind):
    router = SkipRouter(D, kind, init_std=0.5).eval()
    x = torch.randn(2, 33, D)
    a, b = router(x), router(x)
    assert torch.equal(a.hard, b.hard)
    z = router.logits(x)
    assert torch.equal(a.hard.bool(), z[..., 1] > z[..., 0])  # argmax (threshold 0.5 <=> z1 > z0 for sigmoid)


def test_training_noise_is_reproducible_with_a_generator_and_zero_noise_is_argmax():
    router = SkipRouter(D, init_std=0.5).train()
    x = torch.randn(4, 50, D)
    a = router(x, generator=torch.Generator().manual_seed(3)).hard
    assert torch.equal(a, router(x, generator=torch.Generator().manual_seed(3)).hard)
    quiet = SkipRouter(D, gumbel_noise=0.0).train()
    quiet.load_state_dict(router.state_dict())
    assert torch.equal(quiet(x).hard, router.eval()(x).hard)


def test_straight_through_forward_is_hard_backward_is_soft():
    soft = torch.rand(5, requires_grad=True)
    hard = (soft > 0.5).float()
    y = straight_through(hard, soft)
    assert torch.equal(y, hard)
    (y * torch.arange(5.0)).sum().backward()
    assert torch.equal(soft.grad, torch.arange(5.0))
    with pytest.raises(ValueError, match="same shape"):
        straight_through(hard, soft[:3])


@pytest.mark.parametrize("kind", LEARNED + ("highway",))
def test_gradients_reach_the_router_weight(kind):
    layer = make(kind)
    x = torch.randn(2, 19, D)
    (layer(x).square().sum() + skip_layer_aux_loss(layer)).backward()
    g = layer.router.proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_aux_loss_gradient_alone_reaches_router_through_straight_through_path():
    layer = make(capacity=0.25, aux_loss_weight=0.1)
    x = torch.randn(2, 40, D)
    layer(x)
    r = layer.last_route.hard.mean()
    loss = skip_layer_aux_loss(layer)
    assert torch.allclose(loss, 0.1 * (r - 0.25) ** 2)
    loss.backward()
    # d loss / d soft_prob = 2 λ (r - P) / N for every token: nonzero whenever r != P
    assert layer.router.proj.weight.grad.abs().sum() > 0
    assert layer.layer.q_proj.weight.grad is None  # the aux loss touches nothing else


def test_random_router_matches_capacity_and_is_not_learned():
    router = SkipRouter(D, "random", capacity=0.3)
    assert router.proj is None and not router.learned
    hard = router(torch.zeros(8, 1000, D), generator=torch.Generator().manual_seed(0)).hard
    assert abs(hard.mean().item() - 0.3) < 0.01
    layer = make("random", capacity=0.3)
    layer(torch.randn(2, 9, D))
    assert float(skip_layer_aux_loss(layer)) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Efficient == dense masked reference
# ---------------------------------------------------------------------------------------------------------------


def assert_pair_equal(results, atol=1e-5):
    (o1, gx1, g1, h1), (o2, gx2, g2, h2) = results
    assert torch.equal(h1, h2), "same decisions"
    torch.testing.assert_close(o1, o2, atol=atol, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=atol, rtol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("router", LEARNED + ("random",))
@pytest.mark.parametrize("b,t,group_size", [(1, 1, None), (2, 7, 1), (3, 17, 4), (4, 33, None), (2, 65, 1000)])
def test_efficient_equals_dense_outputs_and_gradients(router, b, t, group_size):
    _, results = run_pair(router, b, t, group_size)
    assert_pair_equal(results)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 4), t=st.integers(1, 40), gsize=st.one_of(st.none(), st.integers(1, 50)),
       seed=st.integers(0, 1000))
def test_efficient_equals_dense_hypothesis(b, t, gsize, seed):
    _, results = run_pair("straight_through_gumbel", b, t, gsize, seed=seed)
    assert_pair_equal(results)


def test_efficient_equals_dense_with_a_padding_mask():
    b, t = 3, 12
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[0, :4] = False  # left padding of the first sequence
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = (causal[None] & keep[:, None, :])[:, None]  # [b, 1, t, t], True = attend
    mask = mask | torch.eye(t, dtype=torch.bool)  # a padded query still sees itself (no empty rows)
    _, results = run_pair("straight_through_gumbel", b, t, 5, mask=mask)
    assert_pair_equal(results)


def test_bf16_efficient_close_to_dense_and_skipped_tokens_exact():
    x, results = run_pair("straight_through_gumbel", 2, 24, 8, dtype=torch.bfloat16)
    (o1, _, _, hard), (o2, _, _, _) = results
    torch.testing.assert_close(o1.float(), o2.float(), atol=3e-2, rtol=3e-2)
    skipped = hard == 0
    assert torch.equal(o1[skipped], x[skipped]) and torch.equal(o2[skipped], x[skipped])


# ---------------------------------------------------------------------------------------------------------------
# Semantics: pass-through, full context, extremes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["efficient", "dense"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_skipped_outputs_equal_inputs_bitwise_and_routed_see_all_keys(implementation, training):
    layer = make(implementation=implementation).train(training)
    plain = layer.layer
    x = torch.randn(3, 21, D)
    out = layer(x)
    routed = layer.last_route.routed
    assert 0 < routed.sum() < routed.numel()
    assert torch.equal(out[~routed], x[~routed])
    # a routed token's output is the plain layer's output: its query attended over the keys/values of every
    # earlier token, routed or skipped (K/V are computed for all tokens)
    torch.testing.assert_close(out[routed], plain(x)[routed], atol=1e-5, rtol=1e-5)


def test_routed_token_depends_on_skipped_earlier_tokens():
    layer = make()
    t = 10
    hard = torch.zeros(1, t)
    hard[0, 9] = 1.0  # only the last token runs the layer
    route = RouterOutput(hard=hard)
    x = torch.randn(1, t, D)
    y = x.clone()
    y[0, 2] = torch.randn(D)  # change a skipped earlier token (not by a constant: LayerNorm removes it)
    a, b = layer(x, route=route), layer(y, route=route)
    assert not torch.allclose(a[0, 9], b[0, 9])
    assert torch.equal(b[0, 2], y[0, 2])


def test_all_routed_equals_plain_layer_and_none_routed_does_no_query_or_ffn_work():
    layer = make()
    x = torch.randn(2, 11, D)
    torch.testing.assert_close(layer(x, route=RouterOutput(hard=torch.ones(2, 11))), layer.layer(x))
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (layer.layer.q_proj, layer.layer.mlp)]
    out = layer(x, route=RouterOutput(hard=torch.zeros(2, 11)))
    for h in hooks:
        h.remove()
    assert torch.equal(out, x) and not calls


def test_group_size_default_and_explicit():
    assert make(capacity=0.25).group_size(100) == 25
    assert make(capacity=0.25, group_size=7).group_size(100) == 7
    assert make(capacity=0.01).group_size(10) == 1


def test_highway_is_gated_mix_of_layer_and_input():
    layer = make("highway")
    x = torch.randn(2, 9, D)
    out = layer(x)
    t = layer.last_route.dense_gate[..., None]
    torch.testing.assert_close(out, t * layer.layer(x) + (1 - t) * x)


def test_top1_softmax_multiplies_gate_probabilities_in():
    layer = make("top1_softmax").eval()
    x = torch.randn(2, 9, D)
    out = layer(x)
    route = layer.last_route
    g1, g0, routed = route.routed_scale, route.skip_scale, route.routed
    torch.testing.assert_close(out[~routed], (g0[..., None] * x)[~routed])
    assert (g1[routed] > 0.5).all()


# ---------------------------------------------------------------------------------------------------------------
# Model-level collection
# ---------------------------------------------------------------------------------------------------------------


def test_aux_loss_and_metrics_collect_every_layer_without_global_state():
    torch.manual_seed(0)
    m1 = TinyDecoder(hidden_size=D, num_heads=HEADS, num_layers=3, max_len=32,
                     skip=SkipLayerOptions(capacity=0.5, aux_loss_weight=0.2), skip_layers=[0, 2])
    m2 = copy.deepcopy(m1)
    assert float(skip_layer_aux_loss(m1)) == 0.0  # nothing ran yet
    m1(torch.randint(0, 256, (2, 16)))
    caps = skip_layer_capacities(m1)
    assert set(caps) == {0, 2}
    expected = sum(0.2 * (r - 0.5) ** 2 for r in caps.values())
    assert abs(float(skip_layer_aux_loss(m1).detach()) - expected) < 1e-6
    assert float(skip_layer_aux_loss(m2)) == 0.0  # another model is unaffected
    metrics = skip_layer_metrics(m1)
    assert set(metrics) == {"skip_layer/capacity_layer_0", "skip_layer/capacity_layer_2", "skip_layer/capacity_mean",
                            "skip_layer/aux_loss"}


def test_state_dict_has_router_and_layer_once():
    m = TinyDecoder(hidden_size=D, num_heads=HEADS, num_layers=2, max_len=8, skip=SkipLayerOptions())
    keys = list(m.state_dict())
    assert "layers.0.router.proj.weight" in keys and "layers.0.layer.q_proj.weight" in keys
    assert not any(".parts." in k for k in keys)


# ---------------------------------------------------------------------------------------------------------------
# Bad input and config
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"capacity": 0.0}, "capacity"), ({"capacity": 1.5}, "capacity"), ({"aux_loss_weight": -0.1}, "aux_loss_weight"),
    ({"group_size": 0}, "group_size"), ({"router": "top2"}, "router"), ({"implementation": "fast"}, "implementation"),
])
def test_bad_options_raise_naming_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        SkipLayerOptions(**kw)


@pytest.mark.parametrize("block,path", [
    ({"capacity": 0}, "skip_layer.capacity"), ({"capacity": 1.01}, "skip_layer.capacity"),
    ({"aux_loss_weight": -1}, "skip_layer.aux_loss_weight"), ({"group_size": 0}, "skip_layer.group_size"),
    ({"router": "gumbel"}, "skip_layer.router"), ({"temperature": 0}, "skip_layer.temperature"),
    ({"capcity": 0.5}, "skip_layer.capcity"), ({"layers": [1, 1]}, "skip_layer.layers"),
    ({"enabled": "yes"}, "skip_layer.enabled"),
])
def test_bad_config_raises_config_error_with_path(block, path):
    with pytest.raises(ConfigError) as info:
        SkipLayerConfig.from_deepspeed({"skip_layer": block})
    assert info.value.issues[0].path == path


def test_config_defaults_and_options():
    cfg = SkipLayerConfig.from_deepspeed({"skip_layer": {"enabled": True, "capacity": 0.25, "layers": [3, 1]}})
    assert cfg.aux_loss_weight == 0.1 and cfg.router == "straight_through_gumbel"
    assert cfg.layer_ids(4) == (1, 3)
    with pytest.raises(ConfigError, match="outside"):
        cfg.layer_ids(3)
    opts = cfg.options(3)
    assert opts.capacity == 0.25 and opts.layer_id == 3
    assert not SkipLayerConfig.from_deepspeed({}).enabled
    assert set(ROUTER_KINDS) == set(SkipLayerConfig.model_fields["router"].annotation.__args__)


def test_bad_input_shapes():
    layer = make()
    with pytest.raises(ValueError, match=r"\[b, t, d\]"):
        layer(torch.randn(4, D))
    with pytest.raises(ValueError, match="route.hard"):
        layer(torch.randn(1, 4, D), route=RouterOutput(hard=torch.ones(1, 5)))
    with pytest.raises(TypeError, match="SkipLayerParts"):
        SkipLayer(torch.nn.Linear(D, D), SkipLayerOptions(), hidden_size=D)
