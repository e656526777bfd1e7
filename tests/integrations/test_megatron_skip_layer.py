"""SkipLayer in megatron-core GPT (CPU, gloo): the routed layer equals TransformerLayer, skipped tokens pass through."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_models import VOCAB, gpt_config, init_parallel  # noqa: E402

from random_ltd.config import SkipLayerConfig  # noqa: E402
from random_ltd.integrations.megatron.skip_layer import (  # noqa: E402
    SkipLayerTransformerLayer,
    gpt_skip_layer_specs,
)
from random_ltd.layers import skip_layer_aux_loss  # noqa: E402
from random_ltd.layers.routers import RouterOutput  # noqa: E402

SEQ, B, D = 16, 2, 32


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    init_parallel()


def build(implementation="efficient", **cfg_kw):
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(0)
    cfg = SkipLayerConfig(enabled=True, capacity=0.5, layers=[1, 2], implementation=implementation)
    model = GPTModel(gpt_config(**cfg_kw), gpt_skip_layer_specs(4, cfg), vocab_size=VOCAB, max_sequence_length=SEQ,
                     position_embedding_type="rope")
    return model


def test_specs_and_state_dict():
    model = build()
    kinds = [isinstance(layer, SkipLayerTransformerLayer) for layer in model.decoder.layers]
    assert kinds == [False, True, True, False]
    extra = {k for k in model.state_dict() if ".router." in k}
    assert extra == {"decoder.layers.1.router.proj.weight", "decoder.layers.2.router.proj.weight"}
    with pytest.raises(ValueError, match="enabled is false"):
        gpt_skip_layer_specs(4, SkipLayerConfig())


@pytest.mark.parametrize("implementation", ["efficient", "dense"])
def test_all_routed_equals_transformer_layer_and_skipped_pass_through(implementation):
    model = build(implementation).train()
    layer = model.decoder.layers[1]
    x = torch.randn(SEQ, B, D)
    rope = model.rotary_pos_emb(SEQ)
    ref, _ = super(SkipLayerTransformerLayer, layer).forward(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    ones = RouterOutput(hard=torch.ones(B, SEQ))
    out = layer.route_forward(x.transpose(0, 1), ctx=rope, route=ones).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    hard = (torch.rand(B, SEQ, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    hard[:, 0] = 1.0
    mixed = layer.route_forward(x.transpose(0, 1), ctx=rope, route=RouterOutput(hard=hard)).transpose(0, 1)
    skipped = hard.t() == 0
    assert torch.equal(mixed[skipped], x[skipped])
    # a routed token attends over every earlier token, routed or not: the dense layer's output at that position
    routed = hard.t() == 1
    torch.testing.assert_close(mixed[routed], ref[routed], rtol=1e-5, atol=1e-5)


def test_efficient_equals_dense_gradients():
    grads = []
    for impl in ("efficient", "dense"):
        model = build(impl).train()
        hard = (torch.rand(B, SEQ, generator=torch.Generator().manual_seed(2)) < 0.5).float()
        layer = model.decoder.layers[1]
        x = torch.randn(SEQ, B, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
        rope = model.rotary_pos_emb(SEQ)
        layer.route_forward(x.transpose(0, 1), ctx=rope, route=RouterOutput(hard=hard)).square().sum().backward()
        grads.append((x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    for name in grads[1][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], rtol=1e-4, atol=1e-5)


def test_model_trains_with_aux_loss_and_router_gets_gradient():
    model = build().train()
    ids = torch.randint(0, VOCAB, (B, SEQ), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ)[None].expand(B, SEQ)
    loss = model(ids, pos, None, labels=ids).float().mean()
    aux = skip_layer_aux_loss(model)
    assert aux.requires_grad
    (loss + aux).backward()
    for i in (1, 2):
        assert model.decoder.layers[i].router.proj.weight.grad.abs().sum() > 0
        assert model.decoder.layers[i].last_route.hard.unique().tolist() in ([0.0, 1.0], [1.0], [0.0])


def test_unsupported_is_refused():
    with pytest.raises(NotImplementedError, match="recompute"):
        build(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    layer = build().train().decoder.layers[1]
    with pytest.raises(NotImplementedError, match="causal"):
        layer(hidden_states=torch.randn(SEQ, B, D), attention_mask=torch.zeros(B, 1, SEQ, SEQ, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="packed_seq_params"):
        layer(hidden_states=torch.randn(SEQ, B, D), attention_mask=None, packed_seq_params=object())
