"""Homotopic budget schedule: visits L, L-1, ..., s; steps per stage or on convergence; state round trip."""

import pytest

from random_ltd.schedules import HomotopicBudget
from random_ltd.schedules.homotopic import homotopic_budgets


@pytest.mark.parametrize("L,s,expected", [(12, 6, [12, 11, 10, 9, 8, 7, 6]), (4, 4, [4]), (5, 2.5, [5, 4, 3, 2.5]),
                                          (3, 0, [3, 2, 1, 0])])
def test_budget_sequence(L, s, expected):
    assert homotopic_budgets(L, s) == [float(x) for x in expected]


def test_stride_and_start():
    assert homotopic_budgets(12, 3, stride=3) == [12.0, 9.0, 6.0, 3.0]
    assert homotopic_budgets(12, 3, stride=2, start=8) == [8.0, 6.0, 4.0, 3.0]


def test_steps_mode_visits_every_budget_for_steps_per_stage():
    sched = HomotopicBudget(12, 3, steps_per_stage=5)
    seen = [sched.budget]
    for _ in range(100):
        seen.append(sched.step())
    budgets = [b for i, b in enumerate(seen) if i == 0 or b != seen[i - 1]]
    assert budgets == [12.0, 11.0, 10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0]
    # each budget but the last is used for exactly 5 optimizer steps
    assert all(seen[:-1].count(b) == 5 for b in budgets[:-1])
    assert sched.done and sched.budget == 3.0


def test_convergence_mode():
    sched = HomotopicBudget(4, 2, step_on="convergence", tolerance=0.01, patience=2, min_steps_per_stage=1)
    assert sched.step(0.5) == 4.0
    assert sched.step(0.001) == 4.0  # 1 converged step < patience
    assert sched.step(0.5) == 4.0    # streak broken
    assert sched.step(0.001) == 4.0
    assert sched.step(0.001) == 3.0  # 2 in a row -> next budget
    assert sched.step(0.001) == 3.0
    assert sched.step(0.001) == 2.0
    assert sched.done and sched.step(1.0) == 2.0


def test_convergence_mode_max_steps_forces_progress():
    sched = HomotopicBudget(3, 1, step_on="convergence", tolerance=1e-9, max_steps_per_stage=3)
    seen = [sched.step(1.0) for _ in range(6)]
    assert seen == [3.0, 3.0, 2.0, 2.0, 2.0, 1.0]


def test_state_round_trip():
    a = HomotopicBudget(8, 2, steps_per_stage=3)
    for _ in range(7):
        a.step()
    b = HomotopicBudget(8, 2, steps_per_stage=3)
    b.load_state_dict(a.state_dict())
    assert [a.step() for _ in range(10)] == [b.step() for _ in range(10)]
    with pytest.raises(ValueError, match="differ"):
        HomotopicBudget(8, 3, steps_per_stage=3).load_state_dict(a.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        homotopic_budgets(4, 5)
    with pytest.raises(ValueError, match="num_layers"):
        homotopic_budgets(0, 0)
    with pytest.raises(ValueError, match="stride"):
        homotopic_budgets(4, 1, stride=0)
    with pytest.raises(ValueError, match="steps_per_stage"):
        HomotopicBudget(4, 1)
    with pytest.raises(ValueError, match="tolerance"):
        HomotopicBudget(4, 1, step_on="convergence")
    with pytest.raises(ValueError, match="step_on"):
        HomotopicBudget(4, 1, step_on="loss", steps_per_stage=1)
    with pytest.raises(ValueError, match="budget term"):
        HomotopicBudget(4, 1, step_on="convergence", tolerance=0.1).step()
