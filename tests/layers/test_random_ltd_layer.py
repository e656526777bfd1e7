"""The random-LTD wrapper: kept tokens see exactly the gathered subsequence, dropped ones pass through."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import Block, TinyGPT
from torch import nn

from random_ltd.config import RandomLTDConfig
from random_ltd.layers import RandomLTDLayer, convert_to_random_ltd, find_layers, unwrap_random_ltd


def cfg(layers=4, order="batch_seq_dim", **kw):
    block = {"enabled": True, "total_layer_num": layers, "hidden_state_order": order,
             "random_ltd_schedule": {"min_value": 4, "max_value": 32, "schedule_type": "fixed_linear",
                                     "schedule_config": {"require_steps": 10, "seq_per_step": 4}}}
    return RandomLTDConfig.model_validate({**block, **kw})


def test_kept_tokens_equal_layer_on_subsequence_and_dropped_untouched():
    torch.manual_seed(0)
    model = TinyGPT(layers=4)
    ref_layer = copy.deepcopy(model.layers[1])
    state = convert_to_random_ltd(model, Block, cfg())
    state.advance(0, {1: 5, 2: 5})
    layer = model.layers[1]
    assert isinstance(layer, RandomLTDLayer) and isinstance(layer, Block)
    b, s = 3, 12
    x = torch.randn(b, s, 16)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s)
    pos = torch.arange(s).expand(b, s)
    state.begin_micro_batch()
    out = layer(x, attention_mask=mask, position_ids=pos)
    idx = state.indices(1, b, s, 5, x.device)
    for i in range(b):
        keep = idx[i]
        dropped = torch.ones(s, dtype=torch.bool)
        dropped[keep] = False
        assert torch.equal(out[i, dropped], x[i, dropped])
        sub_mask = torch.ones(5, 5, dtype=torch.bool).triu(1)[None, None]
        expected = ref_layer(x[i:i + 1, keep], attention_mask=sub_mask, position_ids=keep[None])
        torch.testing.assert_close(out[i:i + 1, keep], expected, rtol=0, atol=1e-6)


def test_mask_and_positions_passed_positionally():
    torch.manual_seed(0)
    model = TinyGPT(layers=3)
    state = convert_to_random_ltd(model, Block, cfg(3))
    state.advance(0, {1: 4})
    x = torch.randn(2, 10, 16)
    mask = torch.ones(10, 10, dtype=torch.bool).triu(1).expand(2, 1, 10, 10)
    pos = torch.arange(10).expand(2, 10)
    state.begin_micro_batch()
    a = model.layers[1](x, mask, pos)
    b = model.layers[1](x, attention_mask=mask, position_ids=pos)
    assert torch.equal(a, b)


def test_eval_and_full_keep_are_bitwise_baseline():
    torch.manual_seed(0)
    base = TinyGPT()
    model = copy.deepcopy(base)
    state = convert_to_random_ltd(model, config=cfg())
    tokens = torch.randint(0, 64, (2, 32))
    model.eval(), base.eval()
    assert torch.equal(model(tokens), base(tokens))
    model.train(), base.train()
    state.advance(0, {1: 32, 2: 40})  # keep >= seq: untouched
    torch.manual_seed(1)
    a = model(tokens)
    torch.manual_seed(1)
    assert torch.equal(a, base(tokens))


def test_state_dict_keys_unchanged_and_unwrap():
    base = TinyGPT()
    model = copy.deepcopy(base)
    convert_to_random_ltd(model, config=cfg())
    assert list(model.state_dict()) == list(base.state_dict())
    base.load_state_dict(model.state_dict(), strict=True)
    unwrap_random_ltd(model)
    assert not any(isinstance(m, RandomLTDLayer) for m in model.modules())
    assert type(model.layers[1]) is Block


def test_default_wraps_all_but_first_and_last_by_object():
    model = TinyGPT(layers=5)
    convert_to_random_ltd(model, config=cfg(5))
    wrapped = [isinstance(m, RandomLTDLayer) for m in model.layers]
    assert wrapped == [False, True, True, True, False]
    assert find_layers(model) == list(model.layers)


def test_layer_ids_and_errors():
    model = TinyGPT(layers=4)
    with pytest.raises(ValueError, match="total_layer_num"):
        convert_to_random_ltd(model, config=cfg(6))
    with pytest.raises(ValueError, match="layer_ids"):
        convert_to_random_ltd(model, config=cfg(), layer_ids=[7])
    with pytest.raises(ValueError, match="no module of class"):
        convert_to_random_ltd(model, nn.GRU, cfg())
    convert_to_random_ltd(model, config=cfg(), layer_ids=[0, 3])
    assert [isinstance(m, RandomLTDLayer) for m in model.layers] == [True, False, False, True]


def test_sequence_first_and_tuple_outputs():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, hidden_states, attention_mask=None):
            return self.lin(hidden_states), "extra"

    layers = nn.ModuleList(SeqFirst() for _ in range(3))
    holder = nn.Sequential()
    holder.layers = layers
    state = convert_to_random_ltd(holder, SeqFirst, cfg(3, "seq_batch_dim"))
    state.advance(0, {1: 3})
    x = torch.randn(7, 2, 8)
    holder.train()
    state.begin_micro_batch()
    out, extra = layers[1](x)
    assert extra == "extra" and out.shape == x.shape
    idx = state.indices(1, 2, 7, 3, x.device)
    for i in range(2):
        dropped = torch.ones(7, dtype=torch.bool)
        dropped[idx[i]] = False
        assert torch.equal(out[dropped, i], x[dropped, i])
        torch.testing.assert_close(out[idx[i], i], layers[1].lin(x[idx[i], i]))


def test_recompute_redraws_same_indices_and_counts_once():
    torch.manual_seed(0)
    model = TinyGPT(layers=4)
    state = convert_to_random_ltd(model, config=cfg())
    state.advance(0, {1: 8, 2: 8})
    tokens = torch.randint(0, 64, (2, 32))

    def run(checkpointed):
        m = copy.deepcopy(model)
        st = m.layers[1].random_ltd_state
        if checkpointed:
            for layer in m.layers:
                orig = layer.forward
                layer.forward = lambda *a, _f=orig, **k: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False,
                                                                                           **k)
        loss = m(tokens, tokens)
        loss.backward()
        return loss, [p.grad.clone() for p in m.parameters()], st.finish_step()

    l1, g1, c1 = run(False)
    l2, g2, c2 = run(True)
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert c1 == c2
    # 2 full layers x 64 tokens + 2 wrapped layers x 2 samples x 8 kept
    assert c1.consumed == 2 * 64 + 2 * 16 and c1.baseline == 4 * 64


def test_data_parallel_ranks_draw_differently():
    models = [TinyGPT(layers=3) for _ in range(2)]
    states = [convert_to_random_ltd(m, config=cfg(3), data_parallel_rank=r) for r, m in enumerate(models)]
    a = states[0].indices(1, 2, 100, 10, torch.device("cpu"))
    b = states[1].indices(1, 2, 100, 10, torch.device("cpu"))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("arg,value,where", [
    ("attention_mask", torch.ones(12, 12, dtype=torch.bool).triu(1).expand(2, 1, 12, 12), "kw"),  # longer mask
    ("attention_mask", torch.zeros(2, 1, 10, 12, dtype=torch.bool), "kw"),  # query axis short
    ("attention_mask", torch.zeros(2, 12, dtype=torch.bool), "pos"),  # padding mask, positional
    ("position_ids", torch.arange(12).expand(2, 12), "kw"),
    ("position_ids", torch.arange(12).expand(2, 12), "pos"),
])
def test_masks_and_positions_must_cover_the_hidden_states(arg, value, where):
    """A mask or position tensor longer than the hidden states used to be sliced silently into the wrong entries."""
    torch.manual_seed(0)
    model = TinyGPT(layers=3)
    state = convert_to_random_ltd(model, Block, cfg(3))
    state.advance(0, {1: 4})
    x = torch.randn(2, 10, 16)
    good = {"attention_mask": torch.ones(10, 10, dtype=torch.bool).triu(1).expand(2, 1, 10, 10),
            "position_ids": torch.arange(10).expand(2, 10)}
    good[arg] = value
    state.begin_micro_batch()
    with pytest.raises(ValueError, match=rf"random-LTD layer 1: {arg} has shape .* hidden states have 10 tokens"):
        if where == "kw":
            model.layers[1](x, **good)
        else:
            model.layers[1](x, good["attention_mask"], good["position_ids"])
    # the right lengths still work ([s] positions too)
    model.layers[1](x, torch.ones(10, 10, dtype=torch.bool).triu(1).expand(2, 1, 10, 10), torch.arange(10))
