"""Schedules: MSLG kept-length growth (mslg) and the LayerToken learning rate (layer_token_lr)."""

from random_ltd.schedules.homotopic import HomotopicBudget as HomotopicBudget
from random_ltd.schedules.layer_token_lr import (
    LayerTokenBudget,
    LayerTokenLR,
    iteration_equivalent,
    layer_token_lr,
    planned_lrs,
    random_ltd_budget,
)
from random_ltd.schedules.mslg import (
    MSLGSchedule,
    PlanRow,
    deepspeed_fixed_linear,
    plan,
    planned_layer_tokens,
    schedule_snapshot,
    token_linear,
    total_saving,
)

__all__ = [
    "LayerTokenBudget",
    "LayerTokenLR",
    "MSLGSchedule",
    "PlanRow",
    "deepspeed_fixed_linear",
    "iteration_equivalent",
    "layer_token_lr",
    "plan",
    "planned_layer_tokens",
    "planned_lrs",
    "random_ltd_budget",
    "schedule_snapshot",
    "token_linear",
    "total_saving",
]
