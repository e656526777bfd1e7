"""HadSkip's homotopic budget: solve budgets ``s_0 = L > L-1 > ... > s`` in turn, each from the previous solution.

Paper section 4.3 ("Homotopic Optimization Strategy"): replace ``s`` in the budget penalty with ``k`` for
``k = s_0, s_1, ..., s_q = s`` with ``s_0 = L``, ``s_{j+1} = s_j - 1`` (``stride``), the last step clipped to ``s``
(so a budget of 2.5 visits ..., 3, 2.5). When to move to the next budget is configurable:

* ``step_on="steps"``: after ``steps_per_stage`` optimizer steps at each budget (the last budget is kept forever);
* ``step_on="convergence"``: once the convergence measure passed to :meth:`step` has been ``<= tolerance`` for
  ``patience`` consecutive steps, and at least ``min_steps_per_stage`` steps were spent at the current budget;
  ``max_steps_per_stage`` (optional) caps the steps at one budget if it never converges. ``HadSkipTrainer`` passes
  the gap ``|mean layers used - k|`` in layers (independent of beta).
"""

from __future__ import annotations

import math
from typing import Any, Literal

__all__ = ["HomotopicBudget", "homotopic_budgets"]

_STATE_FORMAT = "random_ltd.homotopic/1"


def homotopic_budgets(num_layers: int, budget: float, stride: float = 1.0, start: float | None = None) -> list[float]:
    """The budgets ``[start (default L), start - stride, ..., budget]`` in layers, strictly decreasing, ending at s."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    start = float(num_layers) if start is None else float(start)
    if not (isinstance(budget, (int, float)) and 0 <= budget <= start <= num_layers):
        raise ValueError(f"need 0 <= budget <= start <= num_layers; got budget={budget!r}, start={start!r}, "
                         f"num_layers={num_layers}")
    if not (isinstance(stride, (int, float)) and stride > 0 and math.isfinite(stride)):
        raise ValueError(f"stride must be a positive finite number, got {stride!r}")
    out, k = [], start
    while k > budget + 1e-9:
        out.append(k)
        k -= stride
    out.append(float(budget))
    return out


class HomotopicBudget:
    """Current budget ``k`` (in layers) of HadSkip stage 3; call :meth:`step` once per optimizer step.

    Example::

        sched = HomotopicBudget(12, 6, steps_per_stage=200)
        for batch in data:
            loss = task + beta * budget_term(gates, sched.budget)
            ...; sched.step(budget_term.item())
    """

    def __init__(self, num_layers: int, budget: float, *, step_on: Literal["steps", "convergence"] = "steps",
                 steps_per_stage: int | None = None, tolerance: float | None = None, patience: int = 1,
                 min_steps_per_stage: int = 0, max_steps_per_stage: int | None = None, stride: float = 1.0,
                 start: float | None = None) -> None:
        self.budgets = homotopic_budgets(num_layers, budget, stride, start)
        if step_on not in ("steps", "convergence"):
            raise ValueError(f"step_on must be 'steps' or 'convergence', got {step_on!r}")
        if step_on == "steps" and (not isinstance(steps_per_stage, int) or steps_per_stage < 1):
            raise ValueError(f"steps_per_stage must be a positive int with step_on='steps', got {steps_per_stage!r}")
        if step_on == "convergence":
            if not isinstance(tolerance, (int, float)) or not tolerance > 0:
                raise ValueError(f"tolerance must be a positive number with step_on='convergence', got {tolerance!r}")
            if not isinstance(patience, int) or patience < 1:
                raise ValueError(f"patience must be a positive int, got {patience!r}")
        if max_steps_per_stage is not None and (not isinstance(max_steps_per_stage, int) or max_steps_per_stage < 1):
            raise ValueError(f"max_steps_per_stage must be a positive int or None, got {max_steps_per_stage!r}")
        self.num_layers = num_layers
        self.step_on = step_on
        self.steps_per_stage = steps_per_stage
        self.tolerance = tolerance
        self.patience = patience
        self.min_steps_per_stage = min_steps_per_stage
        self.max_steps_per_stage = max_steps_per_stage
        self.index = 0
        self.steps_in_stage = 0
        self.converged_steps = 0
        self.total_steps = 0

    @property
    def budget(self) -> float:
        """Current budget ``k`` in layers."""
        return self.budgets[self.index]

    @property
    def done(self) -> bool:
        """True once the final budget ``s`` is reached."""
        return self.index == len(self.budgets) - 1

    def step(self, budget_term: float | None = None) -> float:
        """Count one optimizer step at the current budget; move to the next budget when due. Returns the budget.

        ``budget_term`` (the convergence measure at this step, e.g. the budget gap in layers) is required with
        ``step_on="convergence"``.
        """
        self.total_steps += 1
        self.steps_in_stage += 1
        if self.done:
            return self.budget
        advance = False
        if self.step_on == "steps":
            advance = self.steps_in_stage >= self.steps_per_stage
        else:
            if budget_term is None:
                raise ValueError("step(budget_term) needs the budget term with step_on='convergence'")
            self.converged_steps = self.converged_steps + 1 if budget_term <= self.tolerance else 0
            advance = self.converged_steps >= self.patience and self.steps_in_stage >= self.min_steps_per_stage
        if self.max_steps_per_stage is not None and self.steps_in_stage >= self.max_steps_per_stage:
            advance = True
        if advance:
            self.index += 1
            self.steps_in_stage = 0
            self.converged_steps = 0
        return self.budget

    def state_dict(self) -> dict[str, Any]:
        """Position in the budget sequence (plain Python types)."""
        return {"format": _STATE_FORMAT, "budgets": list(self.budgets), "index": self.index,
                "steps_in_stage": self.steps_in_stage, "converged_steps": self.converged_steps,
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the budget sequence must be the one this schedule was built with."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a homotopic budget state (format {state.get('format')!r}, "
                             f"expected {_STATE_FORMAT!r})")
        if [float(b) for b in state["budgets"]] != self.budgets:
            raise ValueError(f"checkpoint budgets {state['budgets']} differ from this schedule's {self.budgets}")
        for key in ("index", "steps_in_stage", "converged_steps", "total_steps"):
            setattr(self, key, int(state[key]))
