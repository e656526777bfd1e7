"""MSLG schedule: DeepSpeed's formula bit for bit, the paper's token recipe, per-layer ratios, accounting, state."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from random_ltd.config import ConfigError, RandomLTDConfig
from random_ltd.schedules.mslg import MSLGSchedule, PlanRow, plan, planned_layer_tokens, total_saving

B = 10**9


def make_config(
    min_value: int = 128,
    max_value: int = 2048,
    seq_per_step: int = 16,
    require_steps: int | None = 200,
    *,
    schedule_type: str = "fixed_linear",
    require_tokens: int | None = None,
    total_layer_num: int = 24,
    layer_ids: list[int] | None = None,
    ratios: dict[int, float] | None = None,
) -> RandomLTDConfig:
    params: dict[str, Any] = {"seq_per_step": seq_per_step}
    if require_steps is not None and schedule_type == "fixed_linear":
        params["require_steps"] = require_steps
    if require_tokens is not None:
        params["require_tokens"] = require_tokens
    block: dict[str, Any] = {
        "enabled": True,
        "total_layer_num": total_layer_num,
        "random_ltd_schedule": {
            "min_value": min_value,
            "max_value": max_value,
            "schedule_type": schedule_type,
            "schedule_config": params,
        },
    }
    if layer_ids is not None:
        block["random_ltd_layer_id"] = layer_ids
    if ratios is not None:
        block["layer_keep_ratios"] = ratios
    return RandomLTDConfig.model_validate(block)


def quiet_schedule(config: RandomLTDConfig) -> MSLGSchedule:
    """MSLGSchedule without the min-not-a-multiple warning (tested separately)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return MSLGSchedule(config)


def ds_scheduler(min_value: int, max_value: int, seq_per_step: int, require_steps: int, *, layers: int = 24,
                 n: int = 22, global_batch_size: int = 8) -> Any:
    """DeepSpeed 0.19.8's own RandomLTDScheduler, configured the way its engine does it."""
    scheduler = pytest.importorskip("deepspeed.runtime.data_pipeline.data_routing.scheduler")
    return scheduler.RandomLTDScheduler({
        "total_layer_num": layers,
        "random_ltd_layer_num": n,
        "global_batch_size": global_batch_size,  # injected by DeepSpeed's engine
        "layer_token_lr_schedule": {"enabled": False},
        "random_ltd_schedule": {
            "min_value": min_value,
            "max_value": max_value,
            "schedule_type": "fixed_linear",
            "schedule_config": {"require_steps": require_steps, "seq_per_step": seq_per_step},
        },
    })


def transcription(step: int, min_value: int, max_value: int, require_steps: int, seq_per_step: int) -> int:
    """Plain transcription of DeepSpeed's BaseScheduler.__fixed_root_get_value(step, root_degree=1)."""
    next_seq = (float(step) / require_steps) ** (1.0 / 1)
    next_seq = math.floor(next_seq * (max_value - min_value) + min_value)
    next_seq -= next_seq % seq_per_step
    return min(next_seq, max_value)


def steps_to_check(require_steps: int) -> list[int]:
    """Every step up to require_steps + 10 for small schedules; a dense sample plus the ends for large ones."""
    if require_steps <= 5000:
        return list(range(require_steps + 11))
    stride = max(1, require_steps // 4000)
    return sorted(set(range(0, require_steps + 11, stride)) | set(range(require_steps - 50, require_steps + 11))
                  | set(range(0, 200)))


# --------------------------------------------------------------------------------------------------------------------
# fixed_linear == DeepSpeed
# --------------------------------------------------------------------------------------------------------------------

DS_CASES = [
    (128, 2048, 16, 200),  # GPT recipe, short
    (128, 2048, 16, 200_000),  # GPT-3 1.3B, 300B tokens
    (128, 512, 16, 2_000_000),  # BERT-large
    (32, 197, 16, 100),  # ViT: max not a multiple of seq_per_step (reached only after require_steps)
    (66, 197, 16, 37),  # min and max not multiples (starts below min, as DeepSpeed does)
    (64, 1000, 7, 333),  # odd granularity
    (16, 48, 16, 3),
    (128, 2048, 16, 7),  # float rounding of t / 7
    (100, 101, 1, 49),
    # float rounding: 7/10 * 1440 + 16 = 1023.999..., so DeepSpeed keeps 1008 where exact arithmetic gives 1024
    (16, 1456, 16, 10),
    (64, 1648, 16, 11),  # 3/11 * 1584 + 64 -> 495.99... -> 480 (exact: 496)
    (1, 91, 1, 10),  # 7/10 * 90 + 1 -> 63 (exact: 64)
]


@pytest.mark.parametrize(("min_value", "max_value", "seq_per_step", "require_steps"), DS_CASES)
def test_fixed_linear_equals_deepspeed_scheduler(min_value: int, max_value: int, seq_per_step: int,
                                                 require_steps: int) -> None:
    ours = quiet_schedule(make_config(min_value, max_value, seq_per_step, require_steps))
    theirs = ds_scheduler(min_value, max_value, seq_per_step, require_steps)
    for step in steps_to_check(require_steps):
        expected = theirs.get_value(step)
        assert ours.kept_length(step) == expected, step
        assert ours.kept_length(step) == transcription(step, min_value, max_value, require_steps, seq_per_step)


@settings(max_examples=300, deadline=None)
@given(
    seq_per_step=st.integers(1, 64),
    min_value=st.integers(1, 4096),
    span=st.integers(0, 4096),
    require_steps=st.integers(1, 10**7),
    step_fraction=st.floats(0.0, 1.2),
)
def test_fixed_linear_equals_deepspeed_randomised(seq_per_step: int, min_value: int, span: int,
                                                  require_steps: int, step_fraction: float) -> None:
    assume(min_value >= seq_per_step)
    ours = quiet_schedule(make_config(min_value, min_value + span, seq_per_step, require_steps))
    theirs = ds_scheduler(min_value, min_value + span, seq_per_step, require_steps)
    step = int(step_fraction * require_steps)
    for t in (step, step + 1, max(0, step - 1)):
        assert ours.kept_length(t) == theirs.get_value(t)


def test_float_expression_reproduced_not_exact_arithmetic() -> None:
    """DeepSpeed computes float(t) / require_steps * (max - min) + min; we keep its rounding (bit for bit)."""
    sched = MSLGSchedule(make_config(16, 1456, 16, 10))
    assert sched.kept_length(7) == 1008  # 0.7 * 1440 = 1007.999... in floating point
    assert 16 + (7 * 1440) // 10 == 1024  # what exact arithmetic would give


def test_max_not_multiple_is_reached_only_after_require_steps() -> None:
    """DeepSpeed's quirk, reproduced: 197 is not a multiple of 16, so 192 is kept until the unclamped value hits 208."""
    sched = MSLGSchedule(make_config(32, 197, 16, 100))
    assert sched.kept_length(100) == 192
    first_full = next(t for t in range(100, 200) if sched.kept_length(t) == 197)
    assert first_full == 107  # 32 + 107/100 * 165 = 208.55 -> 208 -> min(208, 197)
    assert sched.kept_length(106) == 192


def test_min_not_multiple_warns_and_starts_below_min() -> None:
    with pytest.warns(UserWarning, match="starts at 192, below min_value"):
        sched = MSLGSchedule(make_config(200, 512, 16, 1000))
    assert sched.kept_length(0) == 192


def test_layer_token_accounting_equals_deepspeed() -> None:
    """DeepSpeed's counter (global_batch * (kept*n + max*(L-n)) per step) equals our plan with seq_len = max."""
    config = make_config(128, 2048, 16, 300)
    theirs = ds_scheduler(128, 2048, 16, 300, global_batch_size=8)
    assert planned_layer_tokens(config, 350, batch_size=8)[0] == theirs.get_total_layer_tokens(350)
    sched = MSLGSchedule(config)
    assert sched.layer_tokens(10, 8) == 8 * (sched.kept_length(10) * 22 + 2048 * 2)


# --------------------------------------------------------------------------------------------------------------------
# fixed_linear_tokens: the paper's GPT recipe; constant
# --------------------------------------------------------------------------------------------------------------------


def paper_gpt_token_config() -> RandomLTDConfig:
    return make_config(128, 2048, 16, schedule_type="fixed_linear_tokens", require_tokens=210 * B)


def test_token_schedule_matches_paper_gpt_recipe() -> None:
    """128 kept at 0 tokens, +16 every 1.75B training tokens, full 2048 after 210B (paper 4.1 / D.1)."""
    sched = MSLGSchedule(paper_gpt_token_config())
    every = 1_750_000_000
    assert sched.kept_length(0, tokens=0) == 128
    for k in range(121):
        assert sched.kept_length(0, tokens=k * every) == 128 + 16 * k
        if k:
            assert sched.kept_length(0, tokens=k * every - 1) == 128 + 16 * (k - 1)
    assert sched.kept_length(0, tokens=210 * B - 1) == 2032
    assert sched.kept_length(0, tokens=210 * B) == 2048
    assert sched.kept_length(0, tokens=300 * B) == 2048
    assert sched.kept_length(10**9, tokens=0) == 128  # the step count does not drive this schedule


def test_token_schedule_counts_from_min_and_reaches_max_exactly() -> None:
    """Unlike DeepSpeed's step formula: never below min, and a non-multiple max is reached at require_tokens."""
    sched = MSLGSchedule(make_config(200, 517, 16, schedule_type="fixed_linear_tokens", require_tokens=1000))
    assert sched.kept_length(0, tokens=0) == 200
    values = [sched.kept_length(0, tokens=t) for t in range(0, 1001)]
    assert set(values) == {200 + 16 * k for k in range(20)} | {517}
    assert values[999] == 504 and values[1000] == 517


def test_token_schedule_needs_tokens() -> None:
    sched = MSLGSchedule(paper_gpt_token_config())
    with pytest.raises(ValueError, match="needs tokens="):
        sched.kept_length(5)


def test_constant_schedule() -> None:
    sched = MSLGSchedule(make_config(100, 512, 16, schedule_type="constant", require_steps=None))
    assert {sched.kept_length(t) for t in (0, 1, 10**6)} == {100}
    assert sched.kept_length(3, tokens=10**12) == 100


# --------------------------------------------------------------------------------------------------------------------
# Property: monotone and bounded
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    seq_per_step=st.integers(1, 64),
    multiple=st.integers(1, 32),
    span=st.integers(0, 5000),
    require=st.integers(1, 10**6),
    steps=st.lists(st.integers(0, 3 * 10**6), min_size=2, max_size=30),
)
def test_kept_length_monotone_and_within_min_max(seq_per_step: int, multiple: int, span: int, require: int,
                                                 steps: list[int]) -> None:
    min_value = seq_per_step * multiple
    max_value = min_value + span
    for schedule in (
        MSLGSchedule(make_config(min_value, max_value, seq_per_step, require)),
        MSLGSchedule(make_config(min_value, max_value, seq_per_step, schedule_type="fixed_linear_tokens",
                                 require_tokens=require)),
    ):
        kept = [schedule.kept_length(t, tokens=t) for t in sorted(steps)]
        assert all(a <= b for a, b in zip(kept, kept[1:]))
        assert all(min_value <= k <= max_value for k in kept)


@settings(max_examples=200, deadline=None)
@given(
    seq_per_step=st.integers(1, 64),
    min_value=st.integers(1, 3000),
    span=st.integers(0, 5000),
    require=st.integers(1, 10**6),
    steps=st.lists(st.integers(0, 3 * 10**6), min_size=2, max_size=30),
)
def test_any_min_value_monotone_and_bounded(seq_per_step: int, min_value: int, span: int, require: int,
                                            steps: list[int]) -> None:
    """With min not a multiple: DeepSpeed's formula may start at round_down(min); the token schedule never does."""
    assume(min_value >= seq_per_step)
    step_sched = quiet_schedule(make_config(min_value, min_value + span, seq_per_step, require))
    token_sched = MSLGSchedule(make_config(min_value, min_value + span, seq_per_step,
                                           schedule_type="fixed_linear_tokens", require_tokens=require))
    for schedule, low in ((step_sched, min_value - min_value % seq_per_step), (token_sched, min_value)):
        kept = [schedule.kept_length(t, tokens=t) for t in sorted(steps)]
        assert all(a <= b for a, b in zip(kept, kept[1:]))
        assert all(low <= k <= min_value + span for k in kept)
    assert token_sched.kept_length(0, tokens=require) == min_value + span
    # DeepSpeed's formula reaches a non-multiple max only once the unclamped value passes the next multiple above it
    # (never when span == 0); a multiple is reached at require_steps.
    top = step_sched.kept_length(10 * require)
    assert top == min_value + span or (top == (min_value + span) - (min_value + span) % seq_per_step)


# --------------------------------------------------------------------------------------------------------------------
# Per-layer ratios and layer-token counts
# --------------------------------------------------------------------------------------------------------------------


def small_config(**kwargs: Any) -> RandomLTDConfig:
    """L=6, random-LTD layers 1..4, kept 16,16,32,48,64 at steps 0..4."""
    return make_config(16, 64, 16, 4, total_layer_num=6, **kwargs)


def test_small_schedule_values() -> None:
    sched = MSLGSchedule(small_config())
    assert [sched.kept_length(t) for t in range(6)] == [16, 16, 32, 48, 64, 64]


def test_layer_keep_ratios() -> None:
    sched = MSLGSchedule(small_config(ratios={1: 0.5, 2: 0.3, 4: 0.01}))
    assert sched.layer_kept_lengths(4) == {1: 32, 2: 19, 3: 64, 4: 1}  # floor(0.3*64)=19; floor(0.64) -> at least 1
    assert sched.layer_kept_lengths(0) == {1: 8, 2: 4, 3: 16, 4: 1}
    # layer tokens: batch * (sum kept_i + seq * (L - n))
    assert sched.layer_tokens(4, batch_size=2) == 2 * (32 + 19 + 64 + 1 + 64 * 2)
    # kept capped at the real sequence length
    assert sched.layer_tokens(4, batch_size=2, seq_len=20) == 2 * (20 + 19 + 20 + 1 + 20 * 2)


def test_layer_keep_ratio_is_exact_decimal() -> None:
    """floor(0.29 * 100) is 29, although 0.29 * 100 == 28.999999999999996 in floating point."""
    config = make_config(100, 512, 16, schedule_type="constant", require_steps=None, total_layer_num=4,
                         ratios={1: 0.29})
    assert MSLGSchedule(config).layer_kept_lengths(0) == {1: 29, 2: 100}


def test_layer_tokens_without_ratios() -> None:
    sched = MSLGSchedule(small_config())
    assert sched.layer_tokens(2, batch_size=3) == 3 * (4 * 32 + 2 * 64)
    assert sched.layer_tokens(2, batch_size=3, seq_len=24) == 3 * (4 * 24 + 2 * 24)
    assert sched.baseline_layer_tokens_per_step(3) == 3 * 64 * 6
    assert sched.layer_tokens(4, batch_size=3) == sched.baseline_layer_tokens_per_step(3)


# --------------------------------------------------------------------------------------------------------------------
# Run accounting and checkpoints
# --------------------------------------------------------------------------------------------------------------------


def test_record_and_saved_fraction() -> None:
    sched = MSLGSchedule(small_config())
    assert sched.saved_fraction == 0.0
    assert sched.current_kept_length == 16
    sched.record(consumed_layer_tokens=75, baseline_layer_tokens=100, samples=2, tokens=128)
    sched.record(consumed_layer_tokens=25, baseline_layer_tokens=100, samples=2, tokens=128)
    assert (sched.step, sched.consumed_samples, sched.consumed_tokens) == (2, 4, 256)
    assert (sched.consumed_layer_tokens, sched.baseline_layer_tokens) == (100, 200)
    assert sched.saved_fraction == pytest.approx(0.5)
    assert sched.current_kept_length == 32
    assert sched.current_layer_kept_lengths == {1: 32, 2: 32, 3: 32, 4: 32}


def test_token_schedule_current_length_uses_recorded_tokens() -> None:
    sched = MSLGSchedule(paper_gpt_token_config())
    sched.record(10, 10, samples=1, tokens=1_750_000_000)
    assert sched.current_kept_length == 144


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"consumed_layer_tokens": -1, "baseline_layer_tokens": 1, "samples": 1, "tokens": 1}, ValueError),
        ({"consumed_layer_tokens": 1.5, "baseline_layer_tokens": 1, "samples": 1, "tokens": 1}, TypeError),
    ],
)
def test_record_rejects_bad_numbers(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="consumed_layer_tokens"):
        MSLGSchedule(small_config()).record(**kwargs)


def test_negative_step_rejected() -> None:
    with pytest.raises(ValueError, match="step must be >= 0"):
        MSLGSchedule(small_config()).kept_length(-1)


def test_state_dict_round_trip() -> None:
    sched = MSLGSchedule(small_config(ratios={2: 0.5}))
    for _ in range(3):
        sched.record(sched.layer_tokens(sched.step, 4), sched.baseline_layer_tokens_per_step(4), 4, 256)
    state = json.loads(json.dumps(sched.state_dict()))  # plain types only
    restored = MSLGSchedule(small_config(ratios={2: 0.5}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored.load_state_dict(state)
    for key in ("step", "consumed_layer_tokens", "baseline_layer_tokens", "consumed_samples", "consumed_tokens"):
        assert getattr(restored, key) == getattr(sched, key)
    assert restored.current_kept_length == sched.current_kept_length == 48
    assert restored.saved_fraction == sched.saved_fraction


def test_changed_config_warns_and_new_config_wins() -> None:
    old = MSLGSchedule(make_config(128, 2048, 16, 200))
    for _ in range(100):
        old.record(1, 1, 1, 1)
    new = MSLGSchedule(make_config(64, 1024, 16, 200))
    with pytest.warns(UserWarning) as record:
        new.load_state_dict(old.state_dict())
    message = str(record[0].message)
    assert "current config wins" in message
    assert "random_ltd_schedule.max_value: 2048 -> 1024" in message
    assert "random_ltd_schedule.min_value: 128 -> 64" in message
    assert "require_steps" not in message  # unchanged fields are not named
    assert new.step == 100
    assert new.current_kept_length == 64 + (1024 - 64) // 2 == 544  # the new schedule, at the restored step


def test_deepspeed_state_is_rejected_clearly() -> None:
    ds_state = {"consumed_layer_tokens": 5, "current_steps": 3, "current_value": 128, "min_value": 128,
                "max_value": 2048}
    with pytest.raises(ValueError, match="DeepSpeed RandomLTDScheduler state"):
        MSLGSchedule(small_config()).load_state_dict(ds_state)


def test_incomplete_disabled_config_cannot_build_a_schedule() -> None:
    with pytest.raises(ConfigError, match=r"random_ltd\.total_layer_num: required to build an MSLG schedule"):
        MSLGSchedule(RandomLTDConfig())


# --------------------------------------------------------------------------------------------------------------------
# Planning helpers
# --------------------------------------------------------------------------------------------------------------------


def tiny_config() -> RandomLTDConfig:
    """L=4, layers 1 and 2 drop, seq 8: kept 4,4,6,6,8,8 (same as the LayerToken LR hand example)."""
    return make_config(4, 8, 2, 4, total_layer_num=4)


def test_plan_rows_by_hand() -> None:
    rows = plan(tiny_config(), steps=6, batch_size=1)
    assert [r.kept for r in rows] == [4, 4, 6, 6, 8, 8]
    assert [r.layer_tokens for r in rows] == [24, 24, 28, 28, 32, 32]  # 2*8 + 2*kept
    assert [r.cumulative_layer_tokens for r in rows] == [24, 48, 76, 104, 136, 168]
    assert [r.cumulative_baseline_layer_tokens for r in rows] == [32 * k for k in range(1, 7)]
    assert rows[0] == PlanRow(step=0, tokens=0, kept=4, layer_tokens=24, baseline_layer_tokens=32,
                              cumulative_layer_tokens=24, cumulative_baseline_layer_tokens=32)
    assert rows[3].tokens == 3 * 8
    assert planned_layer_tokens(tiny_config(), 6, 1) == (168, 192)
    assert total_saving(tiny_config(), 6, 1) == pytest.approx(1 - 168 / 192)
    assert total_saving(tiny_config(), 0, 1) == 0.0


def test_plan_drives_token_schedule_with_planned_tokens() -> None:
    config = make_config(4, 8, 2, schedule_type="fixed_linear_tokens", require_tokens=40, total_layer_num=4)
    rows = plan(config, steps=7, batch_size=1, seq_len=8)  # tokens before step t: 8t
    # kept = 4 + 2 * floor(8t * (8 - 4) / (40 * 2)) = 4 + 2 * floor(0.4 t); 8 from 40 tokens (t = 5) on
    assert [r.kept for r in rows] == [4, 4, 4, 6, 6, 8, 8]
    assert [r.tokens for r in rows] == [8 * t for t in range(7)]


def test_paper_gpt_saving() -> None:
    """300B tokens, batch 512 x 2048: the token recipe saves 30.3% of all layer-tokens (22 of 24 layers drop).

    The paper's "1/3" counts only the dropping layers: (1 - 1080/2048) * 0.7 = 0.331 there.
    """
    steps = 300 * B // (512 * 2048)
    saving = total_saving(paper_gpt_token_config(), steps, batch_size=512, seq_len=2048)
    dropped_share_middle = (1 - 1080 / 2048) * (210 / 300)  # average kept 1080 over the first 210B tokens
    assert saving == pytest.approx(dropped_share_middle * 22 / 24, rel=2e-3)
