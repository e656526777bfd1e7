"""torch.compile of a megatron-core GPT with random-LTD layers over a whole MSLG schedule (CPU, gloo, shim).

The kept length grows every two steps; the compiled model must not recompile at every new length nor at every step.
Counted with torch._dynamo's frame counter, backend "eager" (dynamo's guards and recompiles are what is measured).
megatron-core itself graph-breaks on CPU (warnings, ``torch.is_inference_mode_enabled``, the shim's current device,
RNG state), so the first step compiles many frames; what matters is what compiles after it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_models import VOCAB, build_gpt, gpt_config, init_parallel  # noqa: E402

import random_ltd  # noqa: E402
from random_ltd import MSLGSchedule, RandomLTDConfig  # noqa: E402
from random_ltd.integrations.megatron.layer import megatron_kept_indices  # noqa: E402

L = 4


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    init_parallel()


def compiled_frames_per_step(seq: int, growth_steps: int) -> tuple[list[int], list[int], list[int]]:
    """(frames compiled at each optimizer step, kept length of each step, layer tokens consumed at each step) over
    the schedule min 8 -> seq by 8s, for a compiled megatron GPT whose middle layers are random-LTD; at every step
    the compiled loss is checked against the same model run eagerly (same seed, so the same kept tokens)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = RandomLTDConfig.model_validate({
        "enabled": True, "total_layer_num": L, "hidden_state_order": "seq_batch_dim",
        "random_ltd_schedule": {"min_value": 8, "max_value": seq,
                                "schedule_config": {"require_steps": growth_steps, "seq_per_step": 8}}})
    model = build_gpt(gpt_config(num_layers=L), random_ltd=True, seq_len=seq).train()
    state = random_ltd.convert_to_random_ltd(model, config=cfg)
    eager = build_gpt(gpt_config(num_layers=L), random_ltd=True, seq_len=seq).train()
    eager_state = random_ltd.convert_to_random_ltd(eager, config=cfg)
    sched = MSLGSchedule(cfg)
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq)[None].expand(2, seq)
    frames, kept, consumed = [], [], []
    # a high recompile limit: growth must show, not hide behind dynamo's fallback to eager at the limit
    with torch._dynamo.config.patch(recompile_limit=1000, accumulated_recompile_limit=10000):
        for step in range(growth_steps + 2):
            state.advance(step, sched.layer_kept_lengths(step))
            eager_state.advance(step, sched.layer_kept_lengths(step))
            before = counters["frames"]["total"]
            loss = compiled(ids, pos, None, labels=ids).float().mean()
            loss.backward()
            frames.append(counters["frames"]["total"] - before)
            consumed.append(state.finish_step().consumed)
            with torch.no_grad():
                ref = eager(ids, pos, None, labels=ids).float().mean()
            assert eager_state.finish_step().consumed == consumed[-1]
            torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=0)
            kept.append(sched.kept_length(step))
    torch._dynamo.reset()
    return frames, kept, consumed


def test_recompiles_stay_a_small_constant_over_the_schedule() -> None:
    short, kept_short, consumed_short = compiled_frames_per_step(seq=32, growth_steps=6)
    long, kept_long, consumed_long = compiled_frames_per_step(seq=96, growth_steps=22)
    assert len(set(kept_short)) == 4 and len(set(kept_long)) == 12
    # the bookkeeping ran at every step, with the step's kept length, although it is outside the graphs
    for kept, consumed in ((kept_short, consumed_short), (kept_long, consumed_long)):
        seq = max(kept)
        assert consumed == [2 * (2 * seq + 2 * k) for k in kept]
    # after the second distinct kept length (dynamo then makes the length dynamic) nothing compiles any more, but
    # once for the full length (no dropping: another code path)
    third, full = kept_long.index(sorted(set(kept_long))[2]), kept_long.index(max(kept_long))
    assert sum(n for t, n in enumerate(long[third:], third) if t != full) == 0, list(zip(kept_long, long))
    # and the recompiles (frames compiled after the first step) do not grow with the number of distinct lengths
    assert sum(long[1:]) == sum(short[1:]) <= 16, (short, long)


class _Rank:
    def __init__(self, rank: int) -> None:
        self._rank = rank

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("rows", [3, 1], ids=["per_sample", "fused_rope_shared"])
def test_bookkeeping_indices_are_the_state_draws(rows) -> None:
    """The indices the layer uses are bitwise the state's draws: plain, and the sequence-parallel stratified picks
    (each rank's own shard, global positions ``pick + shard * shard_len``), per sample or shared by the batch by
    fused RoPE; and each call is recorded for the layer-token count."""
    cpu = torch.device("cpu")
    state = random_ltd.RandomLTDState(total_layers=L)
    state.advance(5, {1: 12, 2: 32})
    state.begin_micro_batch()
    local, global_idx = megatron_kept_indices(state, 1, 3, 32, 1, None, rows, cpu)
    assert local is global_idx and torch.equal(local, state.indices(1, rows, 32, 12, cpu))
    assert megatron_kept_indices(state, 2, 3, 32, 1, None, rows, cpu) is None
    assert state.finish_step().consumed == 3 * (12 + 3 * 32)

    state.begin_micro_batch()
    for rank in range(2):
        local, global_idx = megatron_kept_indices(state, 1, 3, 16, 2, _Rank(rank), rows, cpu)
        picks = state.sharded_indices(1, rows, 16, 6, 2, cpu)
        assert torch.equal(local, picks[rank])
        assert torch.equal(global_idx, torch.cat([picks[0], picks[1] + 16], dim=1))
    with pytest.raises(ValueError, match="kept length 12 must be divisible by the tensor-parallel size 8"):
        megatron_kept_indices(state, 1, 3, 4, 8, _Rank(0), rows, cpu)
