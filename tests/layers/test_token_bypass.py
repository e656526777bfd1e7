"""TokenBypass (Hou et al. 2022) as a random-LTD state: loss-ranked selection, special tokens, one kept set for the
whole bypassed block, and the same result as literally bypassing the block."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from random_ltd import ConfigError, MSLGSchedule, RandomLTDConfig
from random_ltd import convert_to_random_ltd as _convert
from random_ltd.layers import RandomLTDLayer, TokenBypassState, select_bypass_indices
from random_ltd.ops import gather_positions, gather_tokens, scatter_tokens, slice_attention_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import TinyGPT  # noqa: E402

VOCAB, SEQ, L = 64, 32, 6


def _config(keep: int = 12, special=(), **extra) -> RandomLTDConfig:
    return RandomLTDConfig.model_validate({
        "enabled": True, "total_layer_num": L,
        "random_ltd_schedule": {"min_value": keep, "max_value": SEQ, "schedule_type": "constant"},
        "token_bypass": {"enabled": True, "special_token_ids": list(special), "moving_average": 0.5},
        **extra,
    })


def convert_to_random_ltd(model, config):
    """Convert and set step 0's kept lengths (what the DeepSpeed engine does)."""
    state = _convert(model, config=config)
    state.advance(0, MSLGSchedule(config).layer_kept_lengths(0))
    return state


def _reference_select(ids: torch.Tensor, scores: dict[int, float], keep: int, special: set[int]) -> torch.Tensor:
    """Per row in plain Python: specials first, then highest score (unseen = highest), ties by position."""
    rows = []
    for row in ids.tolist():
        def rank(t, row=row):
            v = row[t]
            return (0 if v in special else 1, 0 if v not in scores else 1, -scores.get(v, 0.0), t)
        rows.append(sorted(sorted(range(len(row)), key=rank)[:keep]))
    return torch.tensor(rows)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 40), vocab=st.integers(1, 12), data=st.data())
def test_select_matches_plain_reference(b, s, vocab, data):
    ids = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=b * s, max_size=b * s))).view(b, s)
    seen = data.draw(st.lists(st.integers(0, vocab - 1), unique=True, max_size=vocab))
    scores = {v: float(data.draw(st.integers(0, 5))) for v in seen}  # small ints: many ties
    special = set(data.draw(st.lists(st.integers(0, vocab - 1), unique=True, max_size=2)))
    n_special = max([sum(v in special for v in row) for row in ids.tolist()] + [0])
    keep = data.draw(st.integers(max(1, n_special), s))
    table = torch.full((vocab,), 0.0)
    seen_mask = torch.zeros(vocab, dtype=torch.bool)
    for v, sc in scores.items():
        table[v], seen_mask[v] = sc, True
    state = TokenBypassState(special_token_ids=tuple(special), scores=table, seen=seen_mask)
    got = select_bypass_indices(ids, state.ranking_scores(), keep, tuple(special))
    torch.testing.assert_close(got, _reference_select(ids, scores, keep, special), rtol=0, atol=0)


def test_select_errors():
    ids = torch.tensor([[1, 2, 1, 3]])
    with pytest.raises(ValueError, match="keep must be in"):
        select_bypass_indices(ids, torch.zeros(4), 5)
    with pytest.raises(ValueError, match="integer tensor"):
        select_bypass_indices(ids.float(), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="2 special tokens but only 1"):
        select_bypass_indices(ids, torch.zeros(4), 1, special_token_ids=(1,))


def test_update_is_a_moving_average_per_vocabulary_id():
    state = TokenBypassState(moving_average=0.75)
    ids = torch.tensor([[3, 5, 3], [5, 5, 7]])
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 6.0]])
    state.update(ids, loss)  # first observation sets the score: mean over occurrences, NaN ignored
    assert state.seen.tolist() == [False] * 3 + [True, False, True, False, True]
    torch.testing.assert_close(state.scores[[3, 5, 7]], torch.tensor([2.0, 3.0, 6.0]))
    state.update(torch.tensor([[3, 9]]), torch.tensor([[10.0, 1.0]]))
    torch.testing.assert_close(state.scores[[3, 5, 7, 9]], torch.tensor([0.75 * 2 + 0.25 * 10, 3.0, 6.0, 1.0]))
    with pytest.raises(ValueError, match="both be \\[b, s\\]"):
        state.update(ids, loss[:, :2])


def _record_layer_io(model):
    """(input, output) of every layer in the last training forward."""
    io = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda m, a, kw, out, i=i: io.__setitem__(i, (kw.get("hidden_states", a[0] if a
                                                                                           else None), out)),
                                    with_kwargs=True)
    return io


def test_sandwich_same_kept_set_highest_loss_and_specials():
    torch.manual_seed(0)
    model = TinyGPT(vocab=VOCAB, hidden=16, layers=L, seq=SEQ).train()
    state = convert_to_random_ltd(model, config=_config(keep=12, special=(0,)))
    assert isinstance(state, TokenBypassState)
    wrapped = [i for i, m in enumerate(model.layers) if isinstance(m, RandomLTDLayer)]
    assert wrapped == [2, 3, 4]  # L/2-1 .. L-2 (Hou et al.'s i = L/2 - 1): the first L/2-1 and the last layer are full
    # scores: id v has loss v (so high ids are kept); special id 0 has the lowest score but is kept anyway
    ids = torch.arange(VOCAB).view(1, VOCAB)
    state.update(ids, ids.float())
    tokens = torch.randint(0, VOCAB, (3, SEQ))
    tokens[:, 5] = 0
    io = _record_layer_io(model)
    model(tokens)
    expected = _reference_select(tokens, {v: float(v) for v in range(VOCAB)}, 12, {0})
    for row in range(3):
        assert 5 in expected[row].tolist()
    for i in wrapped:
        x, y = io[i]
        changed = (y != x).any(dim=-1)  # [b, s]: positions the layer touched
        dropped = torch.ones_like(changed)
        dropped.scatter_(1, expected, False)
        assert not changed[dropped].any(), f"layer {i} changed a bypassed token"
        assert changed[~dropped].all(), f"layer {i} skipped a kept token"
    for i in set(range(L)) - set(wrapped):
        x, y = io[i]
        assert (y != x).any(dim=-1).all(), f"full layer {i} skipped tokens"


def test_equals_literal_bypass_of_the_block_forward_and_backward():
    """gather -> layer -> scatter in each middle layer with one kept set == gather once, run the block, scatter."""
    torch.manual_seed(1)
    model = TinyGPT(vocab=VOCAB, hidden=16, layers=L, seq=SEQ).train()
    ref = TinyGPT(vocab=VOCAB, hidden=16, layers=L, seq=SEQ).train()
    ref.load_state_dict(model.state_dict())
    state = convert_to_random_ltd(model, config=_config(keep=9))
    state.update(torch.arange(VOCAB).view(1, -1), torch.rand(1, VOCAB))
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    out = model(tokens)

    idx = select_bypass_indices(tokens, state.ranking_scores(), 9)
    b, s = tokens.shape
    mask = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s)
    pos = torch.arange(s).expand(b, s)
    x = ref.embed(tokens)
    for layer in ref.layers[:2]:
        x = layer(x, attention_mask=mask, position_ids=pos)
    kept = gather_tokens(x, idx, batch_first=True)
    kmask, kpos = slice_attention_mask(mask, idx), gather_positions(pos, idx)
    for layer in ref.layers[2:5]:
        kept = layer(kept, attention_mask=kmask, position_ids=kpos)
    x = ref.layers[5](scatter_tokens(x, kept, idx, batch_first=True), attention_mask=mask, position_ids=pos)
    expected = ref.head(x)
    torch.testing.assert_close(out, expected)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_eval_is_full_and_missing_ids_error_and_state_dict():
    model = TinyGPT(vocab=VOCAB, hidden=16, layers=L, seq=SEQ)
    ref = TinyGPT(vocab=VOCAB, hidden=16, layers=L, seq=SEQ)
    ref.load_state_dict(model.state_dict())
    state = convert_to_random_ltd(model, config=_config())
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(model.eval()(tokens), ref.eval()(tokens), rtol=0, atol=0)
    model.train()
    state._input_ids = None
    with pytest.raises(RuntimeError, match="no token ids"):
        model.layers[3](torch.randn(2, SEQ, 16))
    with pytest.raises(NotImplementedError, match="sequence parallelism is not supported"):
        state.sharded_indices(3, 2, SEQ // 2, 4, 2, torch.device("cpu"))
    state.update(tokens, torch.rand(2, SEQ))
    other = TokenBypassState()
    other.load_state_dict(state.state_dict())
    torch.testing.assert_close(other.scores, state.scores)
    assert torch.equal(other.seen, state.seen)


def test_config_defaults_and_errors():
    cfg = _config()
    assert cfg.random_ltd_layer_id == [2, 3, 4] and cfg.token_bypass.moving_average == 0.5
    explicit = _config(layer_set="all_but_first_and_last")  # the paper's "Set 2"
    assert explicit.random_ltd_layer_id == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="token_bypass.special_token_ids"):
        _config(special=(-1,))
    with pytest.raises(ConfigError, match="layer_keep_ratios: not supported with token_bypass"):
        _config(layer_keep_ratios={"3": 0.5})
    with pytest.raises(ConfigError, match="not a consecutive run"):
        _config(random_ltd_layer_id=[1, 3])
    with pytest.raises(ConfigError, match="token_bypass.typo"):
        RandomLTDConfig.model_validate({"token_bypass": {"typo": 1}})
