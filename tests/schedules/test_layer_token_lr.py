"""LayerToken LR: reduces to iteration schedules without dropping, matches Appendix C by hand with dropping."""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import pytest
import torch

from random_ltd.config import LayerTokenLRConfig, LayerTokenLRSchedule, RandomLTDConfig
from random_ltd.schedules.layer_token_lr import (
    LayerTokenBudget,
    LayerTokenLR,
    iteration_equivalent,
    layer_token_lr,
    random_ltd_budget,
)
from random_ltd.schedules.mslg import MSLGSchedule

# Many tests step the scheduler without a training step; torch's "scheduler before optimizer" hint is irrelevant
# there (our LR depends on the explicit count, not on the number of calls).
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")

L, SEQ, BATCH = 24, 128, 4
UNIT = L * SEQ * BATCH  # layer-tokens of one optimizer step without dropping
PEAK = 3e-4


def optimizer(lr: float | torch.Tensor = PEAK, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def iteration_lr(k: int, *, warmup: int, total: int, decay: str, peak: float = PEAK, min_lr: float = 0.0) -> float:
    """Plain iteration-based schedule after k optimizer steps (Megatron-LM's convention, no lag)."""
    if k < warmup:
        return peak * k / warmup
    if decay == "constant":
        return peak
    progress = min(1.0, (k - warmup) / (total - warmup))
    shape = 1 - progress if decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr + (peak - min_lr) * shape


# --------------------------------------------------------------------------------------------------------------------
# The pure formula
# --------------------------------------------------------------------------------------------------------------------


def test_formula_points() -> None:
    kw: dict[str, Any] = {"lr": 1.0, "total_layer_tokens": 1000, "warmup_layer_tokens": 200, "min_lr": 0.1}
    assert layer_token_lr(0, **kw) == 0.0
    assert layer_token_lr(50, **kw) == pytest.approx(0.25)
    assert layer_token_lr(199, **kw) == pytest.approx(199 / 200)  # last warmup layer-token
    assert layer_token_lr(200, **kw) == pytest.approx(1.0)
    assert layer_token_lr(600, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine half way
    assert layer_token_lr(600, **kw, decay_type="linear") == pytest.approx(0.55)
    assert layer_token_lr(400, **kw, decay_type="linear") == pytest.approx(0.1 + 0.9 * 0.75)
    assert layer_token_lr(1000, **kw) == pytest.approx(0.1)
    assert layer_token_lr(10**9, **kw) == pytest.approx(0.1)  # clamped at min_lr after total
    assert layer_token_lr(10**9, **kw, decay_type="constant") == 1.0
    assert layer_token_lr(0, lr=1.0, total_layer_tokens=10) == 1.0  # no warmup: starts at the peak
    assert layer_token_lr(5, lr=1.0, total_layer_tokens=5, warmup_layer_tokens=5, min_lr=0.2) == 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_type": "log"}, "'log' warmup needs a step unit"),
        ({"decay_type": "step"}, "decay_type must be one of"),
        ({"total_layer_tokens": 0}, "total_layer_tokens must be > 0"),
        ({"warmup_layer_tokens": 2000}, r"warmup_layer_tokens must be in \[0, total_layer_tokens=1000\]"),
        ({"min_lr": -1.0}, "min_lr must be >= 0"),
    ],
)
def test_formula_rejects_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    settings = {"lr": 1.0, "total_layer_tokens": 1000, "warmup_layer_tokens": 100, **kwargs}
    with pytest.raises(ValueError, match=match):
        layer_token_lr(10, **settings)


@pytest.mark.parametrize(("count", "error"), [(-1, ValueError), (float("nan"), TypeError), ("5", TypeError)])
def test_formula_rejects_bad_counts(count: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="consumed layer-tokens"):
        layer_token_lr(count, lr=1.0, total_layer_tokens=10)


# --------------------------------------------------------------------------------------------------------------------
# No dropping == iteration-based schedules
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_no_dropping_equals_iteration_schedule(decay: str) -> None:
    warmup, total = 7, 40
    budget = iteration_equivalent(warmup_steps=warmup, total_steps=total, batch_size=BATCH, seq_len=SEQ, num_layers=L)
    opt = optimizer()
    sched = LayerTokenLR(opt, total_layer_tokens=budget.total_layer_tokens,
                         warmup_layer_tokens=budget.warmup_layer_tokens, decay_type=decay, min_lr=1e-5)
    assert opt.param_groups[0]["lr"] == 0.0  # LR of the first step: nothing consumed yet
    for k in range(1, total + 6):
        opt.step()
        sched.step(k * UNIT)
        expected = iteration_lr(k, warmup=warmup, total=total, decay=decay, min_lr=1e-5)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-18), k


def test_no_dropping_equals_deepspeed_warmup_decay_lr() -> None:
    """DeepSpeed's WarmupDecayLR (linear warmup from warmup_min_lr=0, linear decay to it) at iteration k.

    DeepSpeed lags one step: its scheduler has last_batch_iteration = k - 1 after k step() calls, so the LR of
    optimizer step k + 1 is f(k - 1). Ours gives f(k) after k steps, so we compare with DeepSpeed evaluated at
    iteration k (``step(last_batch_iteration=k)``).
    """
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    warmup, total = 10, 50
    ds_opt = optimizer()
    ds = lr_schedules.WarmupDecayLR(ds_opt, total_num_steps=total, warmup_min_lr=0.0, warmup_max_lr=PEAK,
                                    warmup_num_steps=warmup, warmup_type="linear")
    opt = optimizer()
    sched = LayerTokenLR(opt, total_layer_tokens=total * UNIT, warmup_layer_tokens=warmup * UNIT, decay_type="linear")
    assert opt.param_groups[0]["lr"] == ds_opt.param_groups[0]["lr"] == 0.0
    for k in range(1, total + 6):
        sched.step(k * UNIT)
        ds.step(last_batch_iteration=k)
        assert sched.get_last_lr()[0] == pytest.approx(ds.get_last_lr()[0], rel=1e-12, abs=1e-18), k


def test_no_dropping_equals_deepspeed_warmup_cosine_lr() -> None:
    """DeepSpeed's WarmupCosineLR (warmup_min_ratio=0, cos_min_ratio = min_lr / lr).

    Same warmup as ours at iteration k. Its decay progress is (k - W + 1) / (T - W), one step ahead of the
    iteration formula (k - W) / (T - W), so it never lands on the peak; our LR after k > W steps equals its value
    at iteration k - 1, and ours is exactly the peak at k = W.
    """
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    warmup, total, ratio = 10, 50, 0.1
    ds_opt = optimizer()
    ds = lr_schedules.WarmupCosineLR(ds_opt, total_num_steps=total, warmup_min_ratio=0.0, warmup_num_steps=warmup,
                                     cos_min_ratio=ratio, warmup_type="linear")
    opt = optimizer()
    sched = LayerTokenLR(opt, total_layer_tokens=total * UNIT, warmup_layer_tokens=warmup * UNIT,
                         decay_type="cosine", min_lr=PEAK * ratio)
    for k in range(1, total + 6):
        sched.step(k * UNIT)
        ds_iteration = k if k < warmup else k - 1
        ds.step(last_batch_iteration=ds_iteration)
        if k == warmup:
            assert sched.get_last_lr()[0] == pytest.approx(PEAK, rel=1e-12)
            continue
        assert sched.get_last_lr()[0] == pytest.approx(ds.get_last_lr()[0], rel=1e-12, abs=1e-18), k


# --------------------------------------------------------------------------------------------------------------------
# With dropping: Appendix C by hand
# --------------------------------------------------------------------------------------------------------------------


def tiny_config() -> RandomLTDConfig:
    """L = 4 layers, s = 8, layers 1 and 2 drop; b_t = 4, 4, 6, 6, 8, 8 (min 4, max 8, +2 per step, 4 steps)."""
    return RandomLTDConfig.model_validate({
        "enabled": True,
        "total_layer_num": 4,
        "random_ltd_schedule": {"min_value": 4, "max_value": 8,
                                "schedule_config": {"require_steps": 4, "seq_per_step": 2}},
    })


def test_appendix_c_budget_by_hand() -> None:
    """Eq. (1): warmup = s * l * T_warmup = 8 * 4 * 3 = 96. Eq. (2) + warmup: sum_t (2s + (l-2) b_t) = 168."""
    # per-step layer-tokens 2*8 + 2*b_t: 24, 24, 28, 28, 32, 32 -> total 168
    assert random_ltd_budget(tiny_config(), warmup_steps=3, total_steps=6, batch_size=1) == LayerTokenBudget(96, 168)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_appendix_c_lr_by_hand(decay: str) -> None:
    mslg = MSLGSchedule(tiny_config())
    opt = optimizer(lr=1.0)
    sched = LayerTokenLR(opt, total_layer_tokens=168, warmup_layer_tokens=96, decay_type=decay,
                         layer_token_source=lambda: mslg.consumed_layer_tokens)
    used = []
    for _ in range(6):
        used.append(opt.param_groups[0]["lr"])  # LR of this step
        opt.step()
        t = mslg.step
        mslg.record(mslg.layer_tokens(t, batch_size=1), mslg.baseline_layer_tokens_per_step(1), samples=1, tokens=8)
        sched.step()
    after = opt.param_groups[0]["lr"]
    # consumed before steps 0..5: 0, 24, 48, 76, 104, 136; after the run: 168
    shape = (lambda x: 1 - x) if decay == "linear" else (lambda x: 0.5 * (1 + math.cos(math.pi * x)))
    expected = [0.0, 24 / 96, 48 / 96, 76 / 96, shape(8 / 72), shape(40 / 72)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert after == pytest.approx(0.0, abs=1e-15)
    # T_LTwarmup: the iteration schedule is at the peak from step 3; LayerToken LR still warms up there
    assert iteration_lr(3, warmup=3, total=6, decay=decay, peak=1.0) == 1.0
    assert used[3] < 1.0
    if decay == "linear":
        assert used[4:] == pytest.approx([64 / 72, 32 / 72])


# --------------------------------------------------------------------------------------------------------------------
# Scheduler mechanics
# --------------------------------------------------------------------------------------------------------------------


def test_step_needs_a_count_or_a_source() -> None:
    sched = LayerTokenLR(optimizer(), total_layer_tokens=100)
    with pytest.raises(RuntimeError, match="needs the consumed layer-token count"):
        sched.step()
    with pytest.raises(ValueError, match=">= 0"):
        sched.step(-5)


def test_construction_uses_source_value() -> None:
    opt = optimizer(lr=1.0)
    LayerTokenLR(opt, total_layer_tokens=100, warmup_layer_tokens=80, layer_token_source=lambda: 40)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_explicit_count_overrides_source_and_tensor_counts_work() -> None:
    opt = optimizer(lr=1.0)
    sched = LayerTokenLR(opt, total_layer_tokens=100, warmup_layer_tokens=80, layer_token_source=lambda: 40)
    sched.step(torch.tensor(20))
    assert sched.consumed_layer_tokens == 20
    assert sched.get_last_lr() == [pytest.approx(0.25)]


def test_peak_lr_per_group() -> None:
    opt = optimizer(groups=2)
    opt.param_groups[1]["lr"] = 1e-2
    sched = LayerTokenLR(opt, total_layer_tokens=100, warmup_layer_tokens=10)
    sched.step(10)
    assert sched.get_last_lr() == [pytest.approx(PEAK), pytest.approx(1e-2)]
    opt2 = optimizer(groups=2)
    sched2 = LayerTokenLR(opt2, total_layer_tokens=100, warmup_layer_tokens=10, lr=0.5)
    sched2.step(5)
    assert sched2.get_last_lr() == [pytest.approx(0.25), pytest.approx(0.25)]
    sched3 = LayerTokenLR(optimizer(groups=2), total_layer_tokens=100, lr=[0.5, 0.1], min_lr=[0.05, 0.01])
    sched3.step(100)
    assert sched3.get_last_lr() == [pytest.approx(0.05), pytest.approx(0.01)]
    assert sched3.lr_at(0) == [pytest.approx(0.5), pytest.approx(0.1)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": [0.1, 0.2]}, "2 values but the optimizer has 1 param groups"),
        ({"min_lr": 1.0}, "min_lr 1.0 > peak lr"),
        ({"warmup_type": "log"}, "warmup_type"),
        ({"warmup_layer_tokens": 101}, "warmup_layer_tokens"),
    ],
)
def test_scheduler_rejects_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerTokenLR(optimizer(), total_layer_tokens=100, **kwargs)


def test_tensor_lr_param_group() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.Adam(params, lr=torch.tensor(0.01))
    sched = LayerTokenLR(opt, total_layer_tokens=100, warmup_layer_tokens=50)
    sched.step(25)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.005)


def test_state_dict_round_trip() -> None:
    counter = {"c": 0}
    opt = optimizer()
    sched = LayerTokenLR(opt, total_layer_tokens=1000, warmup_layer_tokens=100,
                         layer_token_source=lambda: counter["c"])
    for c in (30, 70, 150):
        opt.step()
        counter["c"] = c
        sched.step()
    state = sched.state_dict()
    assert "_layer_token_source" not in state and "optimizer" not in state
    buffer = io.BytesIO()
    torch.save(state, buffer)  # picklable although the source is a lambda
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    opt2 = optimizer()
    restored = LayerTokenLR(opt2, total_layer_tokens=1000, warmup_layer_tokens=100,
                            layer_token_source=lambda: counter["c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored.load_state_dict(loaded)
    assert restored.consumed_layer_tokens == 150
    assert restored.last_epoch == sched.last_epoch == 3
    assert restored.get_last_lr() == sched.get_last_lr()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    counter["c"] = 400
    opt.step()
    opt2.step()
    sched.step()
    restored.step()
    assert restored.get_last_lr() == sched.get_last_lr()


def test_load_state_dict_with_changed_hyperparameters_warns_and_current_wins() -> None:
    sched = LayerTokenLR(optimizer(), total_layer_tokens=1000, warmup_layer_tokens=100)
    sched.step(500)
    other = LayerTokenLR(optimizer(), total_layer_tokens=2000, warmup_layer_tokens=100)
    with pytest.warns(UserWarning, match="total_layer_tokens: 1000 -> 2000"):
        other.load_state_dict(sched.state_dict())
    assert other.total_layer_tokens == 2000
    assert other.get_last_lr()[0] == pytest.approx(layer_token_lr(500, lr=PEAK, total_layer_tokens=2000,
                                                                  warmup_layer_tokens=100))


def test_real_training_loop_without_ordering_warnings() -> None:
    """Works with a real model and optimizer; the LR in each param group follows the formula."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    consumed = {"c": 0}
    sched = LayerTokenLR(opt, total_layer_tokens=20 * UNIT, warmup_layer_tokens=4 * UNIT, min_lr=1e-4,
                         layer_token_source=lambda: consumed["c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(25):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            consumed["c"] += UNIT * (step % 3 + 1) // 3  # fewer layer-tokens than the baseline in some steps
            sched.step()
            expected = layer_token_lr(consumed["c"], lr=1e-2, total_layer_tokens=20 * UNIT,
                                      warmup_layer_tokens=4 * UNIT, min_lr=1e-4)
            assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_from_config_both_forms() -> None:
    opt = optimizer()
    sched = LayerTokenLR.from_config(opt, LayerTokenLRConfig(total_layer_tokens=100, warmup_layer_tokens=10, lr=0.5,
                                                             decay_type="linear", min_lr=0.1))
    sched.step(55)
    assert sched.get_last_lr()[0] == pytest.approx(0.1 + 0.4 * 0.5)
    block = LayerTokenLRSchedule(enabled=True, total_layer_tokens=100)
    sched2 = LayerTokenLR.from_config(optimizer(), block)
    assert sched2.peak_lrs == [PEAK]
    assert sched2.get_last_lr()[0] == pytest.approx(PEAK)  # no warmup: the peak from the start
    with pytest.raises(ValueError, match="no total_layer_tokens"):
        LayerTokenLR.from_config(optimizer(), LayerTokenLRSchedule())


def test_iteration_equivalent() -> None:
    budget = iteration_equivalent(warmup_steps=2000, total_steps=10000, batch_size=512, seq_len=2048, num_layers=24)
    assert budget == LayerTokenBudget(24 * 2048 * 512 * 2000, 24 * 2048 * 512 * 10000)
    with pytest.raises(ValueError, match="warmup_steps 5 > total_steps 4"):
        iteration_equivalent(warmup_steps=5, total_steps=4, batch_size=1, seq_len=1, num_layers=1)
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        iteration_equivalent(warmup_steps=0, total_steps=4, batch_size=1.5, seq_len=1, num_layers=1)  # type: ignore


def test_planned_lrs_step_at_the_layer_tokens_consumed_before_them() -> None:
    """Step i runs at the LR of what steps 0..i-1 consumed (no lag): checked against the formula by hand."""
    from random_ltd.schedules import plan, planned_lrs

    cfg = RandomLTDConfig.model_validate({
        "enabled": True, "total_layer_num": 4, "random_ltd_layer_id": [1, 2],
        "random_ltd_schedule": {"min_value": 4, "max_value": 8, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 2, "seq_per_step": 2}}})
    rows = plan(cfg, 4, 1, 8)
    per_step = [2 * 8 + 2 * kept for kept in (4, 6, 8, 8)]  # 2 full layers + 2 layers at the kept length
    assert [r.layer_tokens for r in rows] == per_step
    lr_cfg = LayerTokenLRSchedule(enabled=True, total_layer_tokens=80, warmup_layer_tokens=30, decay_type="linear")
    before = [0, 24, 52, 84]
    expected = [0.1 * c / 30 if c < 30 else max(0.0, 0.1 * (1 - (c - 30) / 50)) for c in before]
    assert planned_lrs(rows, lr_cfg, 0.1) == pytest.approx(expected)
    assert planned_lrs([], lr_cfg, 0.1) == []
    with pytest.raises(ValueError, match="no total_layer_tokens"):
        planned_lrs(rows, LayerTokenLRSchedule(), 0.1)
