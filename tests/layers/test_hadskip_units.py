"""HadSkip's budget penalty in layers (so the paper's beta = 1 holds the budget) and homotopy switching by
convergence (the default), with a step cap (issue 15 items 8 and 9)."""

from __future__ import annotations

import pytest
import torch
from test_hadskip import ToyHadSkipModel

from random_ltd.config import HadSkipConfig
from random_ltd.hadskip_trainer import HadSkipTrainer
from random_ltd.layers.hadskip import budget_penalty

L = 4


@pytest.mark.parametrize("layers", [4, 12, 24])
def test_one_layer_of_overshoot_costs_beta_at_any_depth(layers: int) -> None:
    gates = torch.zeros(3, layers)
    gates[:, :4] = 1.0  # 4 layers used by every sequence
    assert budget_penalty(gates, 3.0, beta=1.0).item() == pytest.approx(1.0)
    assert budget_penalty(gates, 3.0, beta=1.0, unit="fraction").item() == pytest.approx(1.0 / layers**2)
    # the two forms differ by exactly L^2
    for budget in (0.5, 2.0, 3.5):
        assert budget_penalty(gates, budget).item() == pytest.approx(
            layers**2 * budget_penalty(gates, budget, unit="fraction").item())


def test_config_defaults_units_and_switching() -> None:
    c = HadSkipConfig(budget=6)
    assert c.beta == 1.0 and c.beta_unit == "layers"
    h = c.homotopic
    assert h.step_on == "convergence" and h.tolerance is None and h.convergence_tolerance == 0.25
    assert h.max_steps_per_stage is None and h.patience == 5
    # a config that gives steps_per_stage (written for the fixed schedule) keeps it
    fixed = HadSkipConfig.model_validate({"budget": 6, "homotopic": {"steps_per_stage": 10}}).homotopic
    assert (fixed.step_on, fixed.steps_per_stage) == ("steps", 10)
    # the dump of a validated config validates again (variants in launch/finetune_hadskip.py do this)
    assert HadSkipConfig.model_validate(c.model_dump()) == c


def _batches(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    ids = torch.randint(0, 50, (8, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(8, 6, dtype=torch.long), "labels": ids[:, 0] % 3}


def _trainer(**over) -> HadSkipTrainer:
    torch.manual_seed(0)
    base = dict(budget=2, num_layers=L, stages={"stage3_steps": 12, "stage3_lr": 1e-2})
    base.update(over)
    return HadSkipTrainer(ToyHadSkipModel(layers=L), HadSkipConfig.model_validate(base))


def test_default_schedule_is_convergence_capped_at_the_even_split() -> None:
    trainer = _trainer()
    sched = trainer.homotopic_schedule(12)
    # budgets 4, 3, 2: half of 12 steps over the 2 intermediate budgets -> cap 3 steps each
    assert sched.step_on == "convergence" and sched.budgets == [4.0, 3.0, 2.0]
    assert sched.max_steps_per_stage == 3 and sched.tolerance == 0.25 and sched.patience == 5
    explicit = _trainer(homotopic={"max_steps_per_stage": 7, "tolerance": 0.5, "patience": 2})
    s = explicit.homotopic_schedule(12)
    assert (s.max_steps_per_stage, s.tolerance, s.patience) == (7, 0.5, 2)


def test_switches_on_convergence_before_the_cap_and_at_the_cap_otherwise() -> None:
    # tolerance above L: every step counts as converged, so with patience 1 each budget lasts one step
    quick = _trainer(homotopic={"tolerance": 10.0, "patience": 1, "max_steps_per_stage": 100})
    logs = quick.train_stage(3, _batches, steps=4)
    assert [e["budget"] for e in logs] == [4.0, 3.0, 2.0, 2.0]
    # a tolerance no sampled batch meets: the cap moves it, after exactly max_steps_per_stage steps
    capped = _trainer(homotopic={"tolerance": 1e-9, "patience": 1, "max_steps_per_stage": 3})
    logs = capped.train_stage(3, _batches, steps=8)
    assert [e["budget"] for e in logs] == [4.0] * 3 + [3.0] * 3 + [2.0] * 2


def test_trainer_logs_the_penalty_in_its_unit_and_the_gap_in_layers() -> None:
    for unit, scale in (("layers", 1.0), ("fraction", 1.0 / L**2)):
        trainer = _trainer(beta=3.0, beta_unit=unit, homotopic={"step_on": "steps", "steps_per_stage": 2})
        for e in trainer.train_stage(3, _batches, steps=3):
            gap = e["mean_layers"] - e["budget"]
            assert e["budget_gap"] == pytest.approx(abs(gap))
            assert e["budget_term"] == pytest.approx(3.0 * scale * gap**2, rel=1e-5, abs=1e-7)
