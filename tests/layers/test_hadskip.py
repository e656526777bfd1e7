"""HadSkip gated layer: exact gates, gradients to the gate, bitwise backbone, real skipping == masked computation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from random_ltd.layers.hadskip import (
    GateFFN,
    HadSkipLayer,
    HadSkipOutput,
    budget_penalty,
    collect_gates,
    hadskip_layers,
    set_gating,
    set_real_skip,
)


class ToyLayer(nn.Module):
    """Pre-norm attention + MLP layer, batch-first, additive mask [b, 1, 1, s]; records attention maps."""

    def __init__(self, h: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(-1)
        self.last_attention = probs.mean(1)
        x = x + self.proj((probs @ v).transpose(1, 2).reshape(b, s, h))
        return x + self.mlp(self.ln2(x))


class ToyHadSkipModel(nn.Module):
    """Embedding -> L gated ToyLayers -> masked mean -> linear classifier; returns HadSkipOutput."""

    def __init__(self, vocab: int = 50, h: int = 16, layers: int = 4, classes: int = 3, **gate_kwargs) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(HadSkipLayer(ToyLayer(h), h, layer_id=i, **gate_kwargs) for i in range(layers))
        self.head = nn.Linear(h, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> HadSkipOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        additive = (1.0 - mask[:, None, None, :].float()) * -1e4
        x = emb = self.embed(input_ids)
        additive = additive.to(emb.dtype)
        hidden, atts = [], []
        for layer in self.layers:
            x = layer(x, additive, gate_mask=mask)
            hidden.append(x)
            atts.append(layer.layer.last_attention)
        w = mask.unsqueeze(-1).to(x.dtype)
        logits = self.head((x * w).sum(1) / w.sum(1))
        gates = collect_gates(self.layers) if self.layers[0].gating else None
        return HadSkipOutput(logits, emb, hidden, atts, gates, mask)


def _batch(b=6, s=7, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[min(1, b - 1), 4:] = 0
    mask[-1, 2:] = 0
    return ids, mask


@pytest.mark.parametrize("estimator", ["reinmax", "ste", "gumbel"])
def test_training_gates_exact_and_gradient_reaches_gate(estimator):
    torch.manual_seed(0)
    model = ToyHadSkipModel(estimator=estimator, init_keep_logit=0.0).train()
    ids, mask = _batch(b=16)
    out = model(ids, mask)
    assert out.gates.shape == (16, 4)
    assert set(out.gates.unique().tolist()) <= {0.0, 1.0}
    assert 0 < out.gates.sum() < out.gates.numel()  # p(keep) = 0.5: both values occur
    (out.logits.square().sum() + budget_penalty(out.gates, 2.0)).backward()
    for layer in model.layers:
        assert layer.gate.fc2.weight.grad is not None and layer.gate.fc2.weight.grad.abs().sum() > 0
        assert layer.gate.fc1.weight.grad.abs().sum() > 0


def test_all_gates_one_is_backbone_bitwise():
    torch.manual_seed(1)
    model = ToyHadSkipModel(init_keep_logit=60.0).train()  # the sampled gates are all 1
    ids, mask = _batch()
    gated = model(ids, mask)
    assert torch.equal(gated.gates, torch.ones(6, 4))
    set_gating(model, False)
    plain = model(ids, mask)
    assert plain.gates is None
    assert torch.equal(gated.logits, plain.logits)
    for a, b in zip(gated.hidden_states, plain.hidden_states):
        assert torch.equal(a, b)


def test_gating_off_calls_the_layer_unchanged():
    torch.manual_seed(2)
    inner = ToyLayer(8)
    wrapped = HadSkipLayer(inner, 8)
    wrapped.gating = False
    x = torch.randn(3, 5, 8)
    assert torch.equal(wrapped(x), inner(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,s,h", [(6, 7, 16), (5, 13, 8), (1, 3, 8)])
def test_real_skip_matches_masked_and_never_runs_skipped_sequences(b, s, h, dtype):
    torch.manual_seed(3)
    model = ToyHadSkipModel(h=h, layers=5, init_keep_logit=0.0).to(dtype).eval()
    for layer in model.layers:  # random, varied gate decisions
        nn.init.normal_(layer.gate.fc2.weight, std=3.0)
    ids, mask = _batch(b=b, s=s)
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [m.layer.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(i, []).append(args[0].clone()))
             for i, m in enumerate(model.layers)]
    set_real_skip(model, True)
    real = model(ids, mask)
    calls = [m.last_calls for m in model.layers]
    for hook in hooks:
        hook.remove()
    set_real_skip(model, False)
    masked = model(ids, mask)
    assert torch.equal(real.gates, masked.gates)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 and b == 1 else {}
    torch.testing.assert_close(real.logits, masked.logits, **tol)
    # the inner layer saw exactly the kept sequences of its input, and nothing for a layer nobody kept
    layer_inputs = [real.embeddings, *real.hidden_states[:-1]]
    for i in range(5):
        kept = real.gates[:, i].bool()
        if not kept.any():
            assert i not in seen
            continue
        assert len(seen[i]) == 1
        assert torch.equal(seen[i][0], layer_inputs[i][kept])
        assert calls[i] == int(kept.sum())


def test_real_skip_mixes_keep_and_skip():
    torch.manual_seed(4)
    model = ToyHadSkipModel(layers=6, init_keep_logit=0.0).eval()
    for layer in model.layers:
        nn.init.normal_(layer.gate.fc2.weight, std=3.0)
    out = model(*_batch(b=16))
    per_layer = out.gates.sum(0)
    assert ((per_layer > 0) & (per_layer < 16)).any(), "test needs a layer with both decisions"


def test_gate_pooling():
    gate = GateFFN(4, 3, pooling="mean")
    x = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(gate.pool(x, mask), torch.stack([x[0, :2].mean(0), x[1, 0]]))
    assert torch.equal(GateFFN(4, pooling="first").pool(x, mask), x[:, 0])


def test_budget_penalty_value_and_errors():
    gates = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])  # 4 of 8 -> mean 0.5
    assert budget_penalty(gates, 2.0).item() == 0.0
    # default unit "layers": rows use 3 and 1 layers, mean 2, one layer over the budget of 1
    torch.testing.assert_close(budget_penalty(gates, 1.0, beta=2.0), torch.tensor(2.0 * 1.0**2))
    # "fraction": mean g 0.5 vs 1/4, i.e. L^2 = 16 times weaker
    torch.testing.assert_close(budget_penalty(gates, 1.0, beta=2.0, unit="fraction"), torch.tensor(2.0 * 0.25**2))
    with pytest.raises(ValueError, match="unit must be 'layers' or 'fraction'"):
        budget_penalty(gates, 1.0, unit="percent")
    with pytest.raises(ValueError, match="budget"):
        budget_penalty(gates, 5.0)
    with pytest.raises(ValueError, match=r"\[b, L\]"):
        budget_penalty(gates[0], 1.0)


def test_bad_construction():
    with pytest.raises(TypeError, match="nn.Module"):
        HadSkipLayer(lambda x: x, 4)
    with pytest.raises(ValueError, match="estimator"):
        HadSkipLayer(nn.Identity(), 4, estimator="argmax")
    with pytest.raises(ValueError, match="tau"):
        HadSkipLayer(nn.Identity(), 4, tau=0.5)
    with pytest.raises(ValueError, match="pooling"):
        GateFFN(4, pooling="max")
    with pytest.raises(ValueError, match=r"\[b, s, h\]"):
        HadSkipLayer(nn.Identity(), 4)(torch.zeros(2, 4))
    model = ToyHadSkipModel()
    assert len(hadskip_layers(model)) == 4


class _RowLayer(nn.Module):
    """Per-token MLP with a mask argument [b, 1, 1, s] and a broadcast [1, s] tensor: exercises row selection."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.lin = nn.Linear(h, h)

    def forward(self, x, mask, bias_1s):
        return torch.tanh(self.lin(x)) * mask.squeeze(1).squeeze(1).unsqueeze(-1) + bias_1s.unsqueeze(-1)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 9), s=st.integers(1, 11), h=st.sampled_from([1, 3, 8]), data=st.data())
def test_real_skip_equals_masked_for_any_gate_pattern(b, s, h, data):
    torch.manual_seed(b * 100 + s)
    layer = HadSkipLayer(_RowLayer(h), h).eval()
    pattern = torch.tensor(data.draw(st.lists(st.booleans(), min_size=b, max_size=b)), dtype=torch.float32)
    layer.gates = lambda hidden, mask=None: pattern
    x = torch.randn(b, s, h)
    mask = (torch.rand(b, 1, 1, s) > 0.3).float()
    bias = torch.randn(1, s)
    calls = []
    layer.layer.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    layer.real_skip = True
    real = layer(x, mask, bias)
    layer.real_skip = False
    masked = layer(x, mask, bias)
    torch.testing.assert_close(real, masked)
    kept = int(pattern.sum())
    assert calls[:-1] == ([kept] if kept else [])  # the last call is the masked run (all b)
    assert torch.equal(real[pattern == 0], x[pattern == 0])  # skipped sequences pass through bitwise
