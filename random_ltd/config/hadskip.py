"""The top-level ``hadskip`` block: learned per-sequence layer skipping (HadSkip, Wang et al. 2023)."""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StrictBool, model_validator

from random_ltd.config.common import (
    ConfigError,
    ConfigIssue,
    Int,
    Real,
    _Block,
    _FieldIssues,
    read_config_file,
)

__all__ = ["HADSKIP_PATH", "HadSkipConfig", "HadSkipHomotopicConfig", "HadSkipStagesConfig"]

HADSKIP_PATH = "hadskip"
"""Dotted key path of the HadSkip block."""

PositiveReal = Annotated[Real, Field(gt=0.0)]
NonNegativeReal = Annotated[Real, Field(ge=0.0)]


class HadSkipHomotopicConfig(_Block):
    """``hadskip.homotopic``: budgets ``L, L-1, ..., s`` solved in turn in stage 3 (paper section 4.3)."""

    _path: ClassVar[str] = HADSKIP_PATH + ".homotopic"

    enabled: StrictBool = Field(True, description="Use the homotopic sequence; false = the target budget from the "
                                "first stage-3 step (the paper's 'w/o homotopic optimization' ablation).")
    step_on: Literal["steps", "convergence"] = Field(
        "steps", description="When to move to the next budget: after steps_per_stage steps, or once the budget "
        "term stayed <= tolerance for patience steps.")
    steps_per_stage: Int | None = Field(None, ge=1, description="Optimizer steps at each budget (step_on 'steps'; "
                                        "default: stage-3 steps spread evenly over the budgets, half the run).")
    tolerance: PositiveReal | None = Field(None, description="Budget-term threshold (step_on 'convergence').")
    patience: Int = Field(5, ge=1, description="Consecutive steps under tolerance before moving on (convergence).")
    max_steps_per_stage: Int | None = Field(None, ge=1, description="Force the move after this many steps at one "
                                            "budget (convergence mode safety net).")
    stride: PositiveReal = Field(1.0, description="Budget decrement between problems (paper: 1 layer).")

    @model_validator(mode="after")
    def _check_mode_fields(self) -> HadSkipHomotopicConfig:
        """tolerance belongs to convergence mode (and is required there)."""
        if self.step_on == "convergence" and self.tolerance is None:
            raise _FieldIssues(("tolerance", "required when step_on is 'convergence' (a positive number)"))
        if self.step_on == "steps" and self.tolerance is not None:
            raise _FieldIssues(("tolerance", f"{self.tolerance} is only used with step_on 'convergence'"))
        return self


class HadSkipStagesConfig(_Block):
    """``hadskip.stages``: optimizer steps and learning rate of the three training stages."""

    _path: ClassVar[str] = HADSKIP_PATH + ".stages"

    stage1_steps: Int = Field(0, ge=0, description="Stage 1: fine-tune the backbone without gates (0 = skip it, "
                              "e.g. when starting from a fine-tuned checkpoint).")
    stage2_steps: Int = Field(0, ge=0, description="Stage 2: backbone frozen, gates trained without the budget.")
    stage3_steps: Int = Field(0, ge=0, description="Stage 3: joint training with the homotopic budget and KD.")
    stage1_lr: PositiveReal = Field(5e-5, description="Stage 1 learning rate (paper grid: 5e-6 .. 5e-5).")
    stage2_lr: PositiveReal = Field(1e-3, description="Stage 2 learning rate (gate parameters only).")
    stage3_lr: PositiveReal = Field(5e-5, description="Stage 3 learning rate (backbone and gates).")


class HadSkipConfig(_Block):
    """``hadskip``: learned per-sequence layer skipping (HadSkip, Wang et al. 2023).

    Loss of stage 3: ``L_t + alpha_p L_p + alpha_h L_h + alpha_att L_att + alpha_emb L_emb + beta (mean g - k/L)^2``
    with ``k`` the current homotopic budget.
    """

    _path: ClassVar[str] = HADSKIP_PATH

    enabled: StrictBool = Field(True, description="Turn HadSkip on.")
    budget: PositiveReal = Field(description="Target expected number of layers used per sequence, s (paper: 3/6/9 "
                                 "of 12). Required.")
    num_layers: Int | None = Field(None, ge=1, description="Gated layers L; checked against the model when given.")
    beta: NonNegativeReal = Field(1.0, description="Budget penalty weight (paper: 1), in fraction-of-layers units.")
    alpha_p: NonNegativeReal = Field(1.0, description="Weight of L_p, KL(teacher || student) on predictions.")
    alpha_h: NonNegativeReal = Field(1.0, description="Weight of L_h, MSE of per-layer hidden states.")
    alpha_att: NonNegativeReal = Field(1.0, description="Weight of L_att, MSE of head-averaged attention maps.")
    alpha_emb: NonNegativeReal = Field(1.0, description="Weight of L_emb, MSE of embedding outputs.")
    estimator: Literal["reinmax", "ste", "gumbel"] = Field("reinmax", description="Gate gradient estimator.")
    tau: PositiveReal = Field(1.0, description="Estimator temperature (reinmax needs >= 1).")
    gate_hidden: Int | None = Field(None, ge=1, description="Hidden width of the gate FFN (default hidden/4).")
    pooling: Literal["mean", "first"] = Field("mean", description="Gate input pooling: masked mean or [CLS].")
    init_keep_logit: Real = Field(2.0, description="Initial keep-minus-skip gate bias (2 -> P(keep) = 0.88).")
    homotopic: HadSkipHomotopicConfig = Field(default_factory=HadSkipHomotopicConfig,
                                              description="Homotopic budget schedule.")
    stages: HadSkipStagesConfig = Field(default_factory=HadSkipStagesConfig, description="Three-stage training.")

    @model_validator(mode="after")
    def _check_budget_vs_layers(self) -> HadSkipConfig:
        """The budget is a number of layers: at most num_layers."""
        if self.num_layers is not None and self.budget > self.num_layers:
            raise _FieldIssues(("budget", f"{self.budget} > num_layers {self.num_layers} (budget is in layers)"))
        return self

    @model_validator(mode="after")
    def _check_tau(self) -> HadSkipConfig:
        """ReinMax is defined for tau >= 1."""
        if self.estimator == "reinmax" and self.tau < 1.0:
            raise _FieldIssues(("tau", f"{self.tau} < 1: reinmax needs tau >= 1"))
        return self

    @classmethod
    def from_file(cls, config: dict[str, Any] | str | os.PathLike[str]) -> HadSkipConfig:
        """The ``hadskip`` block of a JSON file or dict (a dict without the key is taken as the block itself).

        A file is read like a DeepSpeed config (:func:`~random_ltd.config.common.read_config_file`): Hjson comments
        are fine, duplicate keys and unreadable files are a ConfigError naming the file.
        """
        if not isinstance(config, dict):
            name = os.fspath(config)
            config = read_config_file(name)
            if not isinstance(config, dict):
                raise ConfigError(f"{name}: expected a JSON object, got {type(config).__name__}")
        block = config.get(HADSKIP_PATH, config) if isinstance(config, dict) else config
        if not isinstance(block, dict):
            raise ConfigError([ConfigIssue(HADSKIP_PATH, f"expected an object, got {block!r}")])
        return cls.model_validate(block)
