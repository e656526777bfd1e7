"""random-LTD megatron-core layers on CPU (gloo, one process): equivalence, eval, state dict, recompute, BERT masks."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_models import (  # noqa: E402
    VOCAB,
    build_bert,
    build_gpt,
    gpt_config,
    init_parallel,
)

from random_ltd import RandomLTDConfig  # noqa: E402
from random_ltd.integrations.megatron import (  # noqa: E402
    RandomLTDTransformerLayer,
    gpt_layer_specs,
    random_ltd_layer_ids,
    unsupported_reasons,
)
from random_ltd.layers import convert_to_random_ltd  # noqa: E402

SEQ = 32


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    init_parallel()


def _attach(model, keep: int, layers=(1, 2)):
    state = convert_to_random_ltd(model, config=RandomLTDConfig(total_layer_num=model.config.num_layers))
    state.advance(0, {i: keep for i in layers})
    return state


def _tokens(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    return ids, torch.arange(SEQ)[None].expand(batch, SEQ)


def test_specs_put_random_ltd_layers_in_the_middle():
    model = build_gpt(gpt_config(), random_ltd=True)
    kinds = [isinstance(layer, RandomLTDTransformerLayer) for layer in model.decoder.layers]
    assert kinds == [False, True, True, False]
    assert random_ltd_layer_ids(4, RandomLTDConfig(total_layer_num=4, random_ltd_layer_id=[2])) == (2,)
    with pytest.raises(ValueError, match="total_layer_num: 6 != num_layers 4"):
        gpt_layer_specs(4, RandomLTDConfig(total_layer_num=6))


@pytest.mark.parametrize("pos", ["rope", "learned_absolute"])
def test_kept_tokens_equal_layer_on_subsequence(pos):
    model = build_gpt(gpt_config(), random_ltd=True, position_embedding_type=pos).train()
    state = _attach(model, keep=12)
    layer = model.decoder.layers[1]
    x = torch.randn(SEQ, 3, 32)
    rope = model.rotary_pos_emb(SEQ) if pos == "rope" else None
    state.begin_micro_batch()
    out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    idx = state.indices(1, 3, SEQ, 12, x.device)
    base_forward = super(RandomLTDTransformerLayer, layer)
    for b in range(3):
        sel = idx[b]
        ref, _ = base_forward._framework_forward(hidden_states=x[sel, b:b + 1], attention_mask=None,
                                                 rotary_pos_emb=None if rope is None else rope[sel])
        torch.testing.assert_close(out[sel, b], ref[:, 0], rtol=1e-5, atol=1e-5)
        dropped = torch.ones(SEQ, dtype=torch.bool)
        dropped[sel] = False
        assert torch.equal(out[dropped, b], x[dropped, b])


def test_rope_rows_are_the_original_positions():
    """Running the kept tokens with rotary rows 0..k-1 (DeepSpeed's behaviour) gives a different result."""
    model = build_gpt(gpt_config(), random_ltd=True).train()
    state = _attach(model, keep=12)
    layer = model.decoder.layers[1]
    with torch.no_grad():
        layer.self_attention.linear_qkv.weight.mul_(8)  # sharp attention, so relative positions matter visibly
    x = torch.randn(SEQ, 1, 32)
    rope = model.rotary_pos_emb(SEQ)
    state.begin_micro_batch()
    out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    sel = state.indices(1, 1, SEQ, 12, x.device)[0]
    wrong, _ = layer._framework_forward(hidden_states=x[sel], attention_mask=None, rotary_pos_emb=rope[:12])
    right, _ = layer._framework_forward(hidden_states=x[sel], attention_mask=None, rotary_pos_emb=rope[sel])
    torch.testing.assert_close(out[sel], right, rtol=1e-5, atol=1e-5)
    assert (out[sel] - wrong).abs().max() > 1e-2


def test_eval_is_bitwise_baseline_and_state_dict_loads_strict():
    cfg = gpt_config()
    base = build_gpt(cfg, random_ltd=False).eval()
    ltd = build_gpt(cfg, random_ltd=True)
    assert list(base.state_dict()) == list(ltd.state_dict())
    ltd.load_state_dict(base.state_dict(), strict=True)
    _attach(ltd, keep=8)
    ltd.eval()
    ids, pos = _tokens()
    with torch.no_grad():
        assert torch.equal(base(ids, pos, None), ltd(ids, pos, None))
    base.load_state_dict(ltd.state_dict(), strict=True)


def _loss_and_grads(config_kw, keep=12):
    model = build_gpt(gpt_config(**config_kw), random_ltd=True, seed=3).train()
    _attach(model, keep=keep)
    ids, pos = _tokens()
    loss = model(ids, pos, None, labels=ids).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    dict(recompute_granularity="selective"),
], ids=["full_uniform", "full_block", "selective"])
def test_recompute_redraws_the_same_indices(recompute):
    loss, grads = _loss_and_grads({})
    loss_rc, grads_rc = _loss_and_grads(recompute)
    assert torch.equal(loss, loss_rc)
    for name in grads:
        assert torch.equal(grads[name], grads_rc[name]), name


def test_training_drops_tokens_and_counts_layer_tokens():
    model = build_gpt(gpt_config(), random_ltd=True).train()
    state = _attach(model, keep=8)
    ids, pos = _tokens(batch=2)
    model(ids, pos, None, labels=ids).float().mean().backward()
    count = state.finish_step()
    assert count.consumed == 2 * (2 * SEQ + 2 * 8)
    assert count.baseline == 2 * 4 * SEQ


def test_bert_padding_never_leaks():
    cfg = gpt_config(num_layers=4)
    model = build_bert(cfg, random_ltd=True).train()
    state = _attach(model, keep=16)
    ids, _ = _tokens(batch=2)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, 20:] = 0
    mask[1, 9:] = 0
    state.begin_micro_batch()
    logits, _ = model(ids, mask)
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 7) % VOCAB
    state.micro_batch -= 1  # the model's pre-hook advances it again: same indices for the second forward
    logits2, _ = model(other, mask)
    keep = mask.bool().t()  # logits are [b, s, v]
    torch.testing.assert_close(logits.transpose(0, 1)[keep], logits2.transpose(0, 1)[keep])
    logits.float().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_every_bert_layer_is_random_ltd_but_only_middle_ones_drop():
    model = build_bert(gpt_config(), random_ltd=True).train()
    assert all(isinstance(layer, RandomLTDTransformerLayer) for layer in model.encoder.layers)
    state = _attach(model, keep=8)
    ids, _ = _tokens(batch=2)
    model(ids, torch.ones(2, SEQ, dtype=torch.long))
    assert state.finish_step().consumed == 2 * (2 * SEQ + 2 * 8)


def test_unsupported_configs_are_refused():
    cfg = types.SimpleNamespace(context_parallel_size=2, multi_latent_attention=True, cuda_graph_impl="local",
                                pipeline_model_parallel_size=2)
    reasons = unsupported_reasons(cfg)
    assert len(reasons) == 4
    assert "context_parallel_size=2" in reasons[0] and "MLA" in reasons[1]
    layer = build_gpt(gpt_config(), random_ltd=True).decoder.layers[1]
    layer.config = cfg
    with pytest.raises(NotImplementedError, match="context_parallel_size=2"):
        layer.check_supported(layer)


def test_packed_sequences_and_missing_state_raise():
    model = build_gpt(gpt_config(), random_ltd=True).train()
    layer = model.decoder.layers[1]
    x = torch.randn(SEQ, 1, 32)
    with pytest.raises(RuntimeError, match="no random-LTD state"):
        layer(hidden_states=x, attention_mask=None)
    _attach(model, keep=8)
    with pytest.raises(NotImplementedError, match="packed"):
        layer(hidden_states=x, attention_mask=None, packed_seq_params=object())
