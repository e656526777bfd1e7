"""HadSkip on megatron-core BERT (CPU, gloo): gates on, off, real skipping, budget, padding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_models import VOCAB, build_bert, gpt_config, init_parallel  # noqa: E402

from random_ltd.config import ConfigError, HadSkipConfig  # noqa: E402
from random_ltd.integrations.megatron.hadskip import MegatronHadSkipLayer, convert_bert_to_hadskip  # noqa: E402
from random_ltd.layers.hadskip import budget_penalty, collect_gates, hadskip_layers, set_real_skip  # noqa: E402

SEQ, B = 32, 4


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    init_parallel()


def _inputs():
    ids = torch.randint(0, VOCAB, (B, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, SEQ, dtype=torch.long)
    mask[1, 20:] = 0
    mask[3, 7:] = 0
    return ids, mask


def _models():
    base = build_bert(gpt_config(), random_ltd=False, seq_len=SEQ).eval()
    gated = build_bert(gpt_config(), random_ltd=False, seq_len=SEQ)
    gated.load_state_dict(base.state_dict())
    convert_bert_to_hadskip(gated, HadSkipConfig(budget=2))
    return base, gated.eval()


def test_gates_all_on_equal_the_backbone_bitwise():
    base, gated = _models()
    for m in hadskip_layers(gated):
        m.force_gate = 1.0
    ids, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(base(ids, mask)[0], gated(ids, mask)[0])
    keys = set(gated.state_dict())
    assert "encoder.layers.0.layer.self_attention.linear_qkv.weight" in keys
    assert any(k.startswith("encoder.layers.0.gate.") for k in keys)


def test_real_skipping_equals_masked_and_skips_the_layer():
    _, gated = _models()
    layers = hadskip_layers(gated)
    pattern = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
    calls = []
    for i, m in enumerate(layers):
        m.gates = lambda hidden, mask=None, i=i: pattern[i].to(hidden.dtype)
        m.layer.register_forward_pre_hook(lambda mod, a, kw, i=i: calls.append((i, kw["hidden_states"].shape[1])),
                                          with_kwargs=True)
    ids, mask = _inputs()
    with torch.no_grad():
        set_real_skip(gated, False)
        masked = gated(ids, mask)[0]
        calls.clear()
        set_real_skip(gated, True)
        real = gated(ids, mask)[0]
    torch.testing.assert_close(real, masked, rtol=1e-5, atol=1e-5)
    assert calls == [(0, 2), (2, 4), (3, 2)]  # layer 1 keeps no sequence: never called
    assert [m.last_calls for m in layers] == [2, 0, 4, 2]


def test_training_gates_are_binary_and_budget_has_gradient():
    _, gated = _models()
    gated.train()
    ids, mask = _inputs()
    logits, _ = gated(ids, mask)
    gates = collect_gates(hadskip_layers(gated))
    assert gates.shape == (B, 4) and set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    (logits.float().mean() + budget_penalty(gates, budget=2.0)).backward()
    assert all(m.gate.parameters().__next__().grad is not None for m in hadskip_layers(gated))


def test_padding_does_not_reach_the_gate():
    _, gated = _models()
    ids, mask = _inputs()
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 5) % VOCAB
    gate = hadskip_layers(gated)[0].gate
    with torch.no_grad():
        # the first layer's gate logits ignore padded positions (its pooling reads the real tokens from the mask)
        from random_ltd.integrations.megatron.hadskip import _real_tokens

        emb1 = gated.embedding(ids, torch.arange(SEQ)[None].expand(B, SEQ)).transpose(0, 1)
        emb2 = gated.embedding(other, torch.arange(SEQ)[None].expand(B, SEQ)).transpose(0, 1)
        m4 = gated.bert_extended_attention_mask(mask)
        m4 = m4 < 0.5 if m4.dtype != torch.bool else m4
        assert torch.equal(_real_tokens(m4), mask)
        torch.testing.assert_close(gate(emb1, _real_tokens(m4)), gate(emb2, _real_tokens(m4)))
        assert not torch.allclose(gate(emb1, None), gate(emb2, None))


def test_errors():
    base = build_bert(gpt_config(), random_ltd=False, seq_len=SEQ)
    with pytest.raises(ConfigError, match="num_layers"):
        convert_bert_to_hadskip(base, HadSkipConfig(budget=2, num_layers=6))
    with pytest.raises(TypeError, match="BertModel"):
        convert_bert_to_hadskip(torch.nn.Linear(2, 2), HadSkipConfig(budget=2))
    gated = convert_bert_to_hadskip(base, {"hadskip": {"budget": 2}})
    assert all(isinstance(m, MegatronHadSkipLayer) for m in gated)
    with pytest.raises(NotImplementedError, match="packed_seq_params"):
        gated[0](hidden_states=torch.randn(SEQ, B, 32), attention_mask=None, packed_seq_params=object())
