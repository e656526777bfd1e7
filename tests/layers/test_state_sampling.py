"""RandomLTDState's batched draw: one sampler call per micro-batch and kept length, bitwise the per-layer draws."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import TinyGPT
from torch.utils._python_dispatch import TorchDispatchMode

import random_ltd.layers.state as state_module
from random_ltd.config import RandomLTDConfig
from random_ltd.layers import RandomLTDState, convert_to_random_ltd
from random_ltd.ops import sample_sorted_indices
from random_ltd.ops.dispatch import select_backend

CPU = torch.device("cpu")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def per_layer(state: RandomLTDState, layer_id: int, batch: int, seq_len: int, keep: int,
              device: torch.device | str = CPU) -> torch.Tensor:
    """Today's per-layer draw: one sampler call of one layer."""
    return sample_sorted_indices(1, batch, seq_len, keep, seed=state.effective_seed, step=state.step,
                                 micro_batch=max(state.micro_batch, 0), layer_offset=layer_id, device=device)[0]


def per_layer_sharded(state: RandomLTDState, layer_id: int, batch: int, shard_len: int, kps: int,
                      shards: int) -> torch.Tensor:
    return sample_sorted_indices(shards, batch, shard_len, kps, seed=state.effective_seed, step=state.step,
                                 micro_batch=max(state.micro_batch, 0), layer_offset=layer_id * shards)


class _SamplerCalls(TorchDispatchMode):
    """Counts calls into the compiled extension's sampler op (whatever Python path leads there)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "sample_sorted_indices" in str(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_sampling(monkeypatch):
    """Counts sampler calls at the public op the state uses and, when the C++ backend serves CPU, in the extension."""
    counts = {"op": 0}
    inner = state_module.sample_sorted_indices

    def counted(*args, **kwargs):
        counts["op"] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(state_module, "sample_sorted_indices", counted)
    mode = _SamplerCalls()
    with mode:
        yield counts
    counts["extension"] = mode.calls if select_backend(CPU).NAME != "torch" else None


def cfg(layers: int, **kw) -> RandomLTDConfig:
    block = {"enabled": True, "total_layer_num": layers, "hidden_state_order": "batch_seq_dim",
             "random_ltd_schedule": {"min_value": 4, "max_value": 32, "schedule_type": "fixed_linear",
                                     "schedule_config": {"require_steps": 10, "seq_per_step": 4}}}
    return RandomLTDConfig.model_validate({**block, **kw})


@pytest.mark.parametrize("kept", [{1: 5, 2: 5, 3: 5, 4: 5}, {1: 5, 2: 9, 3: 5, 4: 12}, {2: 7}, {1: 40, 3: 6}],
                         ids=["uniform", "mixed", "one", "one-full"])
@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("device", DEVICES)
def test_batched_draw_is_bitwise_the_per_layer_draw(kept, order, device):
    state = RandomLTDState(seed=77, data_parallel_rank=3, total_layers=6)
    for step in (0, 5):
        state.advance(step, kept)
        for _ in range(3):  # micro-batches
            state.begin_micro_batch()
            for batch, seq_len in ((3, 12), (1, 12), (3, 31)):
                ids = sorted(kept, reverse=order == "descending")
                for lid in ids:
                    keep = state.kept_length(lid, seq_len)
                    if keep >= seq_len:
                        continue
                    got = state.indices(lid, batch, seq_len, keep, torch.device(device))
                    assert got.shape == (batch, keep) and got.device.type == device
                    expected = per_layer(state, lid, batch, seq_len, keep, device)
                    assert torch.equal(got, expected), (step, lid, batch, seq_len)
        state.finish_step()


def test_direct_calls_outside_the_schedule_match():
    """A layer id or kept length the schedule does not name still gets its own per-layer draw."""
    state = RandomLTDState(seed=5)
    state.advance(2, {1: 4, 2: 4})
    assert torch.equal(state.indices(1, 2, 10, 4, CPU), per_layer(state, 1, 2, 10, 4))
    assert torch.equal(state.indices(7, 2, 10, 4, CPU), per_layer(state, 7, 2, 10, 4))
    assert torch.equal(state.indices(1, 2, 10, 3, CPU), per_layer(state, 1, 2, 10, 3))
    assert torch.equal(state.indices(0, 2, 10, 4, CPU), per_layer(state, 0, 2, 10, 4))


def test_sharded_and_plain_and_batch_shared_draws_do_not_mix():
    """Sequence-parallel picks, fused-RoPE batch-shared picks ([1, k]) and plain picks: each its own draw."""
    state = RandomLTDState(seed=11, total_layers=5)
    state.advance(1, {1: 8, 2: 8, 3: 8})
    state.begin_micro_batch()
    for lid in (1, 2, 3):
        plain = state.indices(lid, 4, 16, 8, CPU)
        shared = state.indices(lid, 1, 16, 8, CPU)
        sharded = state.sharded_indices(lid, 4, 8, 4, 2, CPU)
        sharded_shared = state.sharded_indices(lid, 1, 8, 4, 2, CPU)
        assert torch.equal(plain, per_layer(state, lid, 4, 16, 8))
        assert torch.equal(shared, per_layer(state, lid, 1, 16, 8))
        assert torch.equal(sharded, per_layer_sharded(state, lid, 4, 8, 4, 2))
        assert sharded.shape == (2, 4, 4)
        assert torch.equal(sharded_shared, per_layer_sharded(state, lid, 1, 8, 4, 2))


def test_cache_follows_seed_step_micro_batch_and_load():
    state = RandomLTDState(seed=1)
    state.advance(0, {1: 4})
    state.begin_micro_batch()
    a = state.indices(1, 2, 50, 4, CPU).clone()
    state.begin_micro_batch()
    b = state.indices(1, 2, 50, 4, CPU)
    assert not torch.equal(a, b) and torch.equal(b, per_layer(state, 1, 2, 50, 4))
    state.micro_batch = 0  # set directly (no begin_micro_batch): still the micro-batch-0 draw
    assert torch.equal(state.indices(1, 2, 50, 4, CPU), a)
    state.seed = 2
    assert torch.equal(state.indices(1, 2, 50, 4, CPU), per_layer(state, 1, 2, 50, 4))
    state.step = 9  # set directly (no advance)
    assert torch.equal(state.indices(1, 2, 50, 4, CPU), per_layer(state, 1, 2, 50, 4))
    state.load_state_dict({"step": 3, "kept_lengths": {"1": 4}})
    assert torch.equal(state.indices(1, 2, 50, 4, CPU), per_layer(state, 1, 2, 50, 4))


def test_draw_made_in_inference_mode_is_not_reused_for_autograd():
    state = RandomLTDState(seed=3)
    state.advance(0, {1: 4})
    with torch.inference_mode():
        state.indices(1, 2, 10, 4, CPU)
    idx = state.indices(1, 2, 10, 4, CPU)
    assert not idx.is_inference()
    x = torch.randn(2, 10, 3, requires_grad=True)
    torch.gather(x, 1, idx[..., None].expand(-1, -1, 3)).sum().backward()


@pytest.mark.parametrize("ratios", [None, {1: 0.5, 3: 0.5}], ids=["uniform", "layer_keep_ratios"])
def test_one_sampler_call_per_micro_batch_and_kept_length(monkeypatch, ratios):
    """Forward, backward under activation recompute, eval in between: 1 call per micro-batch and kept length."""
    torch.manual_seed(0)
    model = TinyGPT(layers=6)
    state = convert_to_random_ltd(model, config=cfg(6, layer_keep_ratios=ratios))
    for layer in model.layers:
        orig = layer.forward
        layer.forward = lambda *a, _f=orig, **k: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **k)
    kept = {1: 8, 2: 8, 3: 8, 4: 8} if ratios is None else {1: 4, 2: 8, 3: 4, 4: 8}
    tokens = torch.randint(0, 64, (2, 32))
    with count_sampling(monkeypatch) as counts:
        for step in range(2):
            state.advance(step, kept)
            for _ in range(3):
                model.train()
                model(tokens, tokens).backward()
                model.eval()
                with torch.no_grad():
                    model(tokens)
            state.finish_step()
    expected = 2 * 3 * len(set(kept.values()))
    assert counts["op"] == expected
    if counts["extension"] is not None:
        assert counts["extension"] == expected


def test_indices_used_by_a_training_forward_are_the_per_layer_draws():
    """The wrapped layers of a model see exactly the per-layer indices (checked through the layer outputs)."""
    torch.manual_seed(0)
    model = TinyGPT(layers=5)
    state = convert_to_random_ltd(model, config=cfg(5, layer_keep_ratios={1: 0.5, 2: 1.0, 3: 0.25}))
    state.advance(4, {1: 6, 2: 12, 3: 3})
    x = torch.randn(2, 16, 16)
    state.begin_micro_batch()
    for lid in (3, 1, 2):
        out = model.layers[lid](x)
        keep = state.kept_length(lid, 16)
        idx = per_layer(state, lid, 2, 16, keep)
        for i in range(2):
            dropped = torch.ones(16, dtype=torch.bool)
            dropped[idx[i]] = False
            assert torch.equal(out[i, dropped], x[i, dropped])
            assert not torch.equal(out[i, idx[i]], x[i, idx[i]])
