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
        "convergence", description="When to move to the next budget: 'convergence' (default unless steps_per_stage "
        "is given): once the mean number of layers used is within tolerance layers of the current budget for "
        "patience consecutive steps, or after max_steps_per_stage steps at it (the cap); 'steps': after "
        "steps_per_stage steps.")
    steps_per_stage: Int | None = Field(None, ge=1, description="Optimizer steps at each budget (step_on 'steps'; "
                                        "default: stage-3 steps spread evenly over the budgets, half the run).")
    tolerance: PositiveReal | None = Field(None, description="Convergence threshold in layers: |mean layers used - "
                                           "current budget| <= tolerance (step_on 'convergence'; default 0.25).")
    patience: Int = Field(5, ge=1, description="Consecutive steps under tolerance before moving on (convergence).")
    max_steps_per_stage: Int | None = Field(None, ge=1, description="Step cap at one budget (convergence mode; "
                                            "default: the 'steps' mode's even split, half of stage 3 over the "
                                            "intermediate budgets).")
    stride: PositiveReal = Field(1.0, description="Budget decrement between problems (paper: 1 layer).")

    @model_validator(mode="before")
    @classmethod
    def _default_step_on(cls, data: Any) -> Any:
        """Without step_on, a given steps_per_stage means 'steps' (configs written before convergence was default)."""
        if isinstance(data, dict) and "step_on" not in data and data.get("steps_per_stage") is not None:
            return {**data, "step_on": "steps"}
        return data

    @model_validator(mode="after")
    def _check_mode_fields(self) -> HadSkipHomotopicConfig:
        """tolerance and the cap belong to convergence mode, steps_per_stage to steps mode."""
        if self.step_on == "steps" and self.tolerance is not None:
            raise _FieldIssues(("tolerance", f"{self.tolerance} is only used with step_on 'convergence'"))
        if self.step_on == "steps" and self.max_steps_per_stage is not None:
            raise _FieldIssues(("max_steps_per_stage", f"{self.max_steps_per_stage} is only used with step_on "
                                "'convergence' (use steps_per_stage)"))
        if self.step_on == "convergence" and self.steps_per_stage is not None:
            raise _FieldIssues(("steps_per_stage", f"{self.steps_per_stage} is only used with step_on 'steps' (the "
                                "convergence mode's cap is max_steps_per_stage)"))
        return self

    @property
    def convergence_tolerance(self) -> float:
        """tolerance, or its default of 0.25 layers."""
        return 0.25 if self.tolerance is None else float(self.tolerance)


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
    stage1_warmup_steps: Int = Field(0, ge=0, description="Stage 1: linear LR warmup from 0 over this many steps "
                                     "(0 = none). A post-LN BERT trained from scratch needs it.")
    stage1_decay: Literal["constant", "linear"] = Field(
        "constant", description="Stage 1 LR after warmup: 'constant' (default) or 'linear' decay to 0 at "
        "stage1_steps (Hugging Face's fine-tuning default). Stages 2 and 3 always use a constant LR.")

    @model_validator(mode="after")
    def _check_warmup(self) -> HadSkipStagesConfig:
        """The warmup fits in stage 1."""
        if self.stage1_warmup_steps > self.stage1_steps:
            raise _FieldIssues(("stage1_warmup_steps", f"{self.stage1_warmup_steps} > stage1_steps "
                                f"{self.stage1_steps}"))
        return self

    def lr_factor(self, stage: int, step: int) -> float:
        """Multiplier of ``stage{stage}_lr`` at optimizer step ``step`` (0-based); a pure function of the step, so a
        resumed stage continues the same schedule."""
        if stage != 1:
            return 1.0
        warm = self.stage1_warmup_steps
        if step < warm:
            return (step + 1) / warm
        if self.stage1_decay == "linear":
            return max(0.0, (self.stage1_steps - step) / max(1, self.stage1_steps - warm))
        return 1.0


class HadSkipConfig(_Block):
    """``hadskip``: learned per-sequence layer skipping (HadSkip, Wang et al. 2023).

    Loss of stage 3: ``L_t + alpha_p L_p + alpha_h L_h + alpha_att L_att + alpha_emb L_emb + beta (m - k)^2``
    with ``k`` the current homotopic budget and ``m`` the mean number of layers used per sequence (``beta_unit``
    "layers", default), or ``beta (mean g - k/L)^2`` (``beta_unit`` "fraction" = ``beta / L^2`` in layers).
    """

    _path: ClassVar[str] = HADSKIP_PATH

    enabled: StrictBool = Field(True, description="Turn HadSkip on.")
    budget: PositiveReal = Field(description="Target expected number of layers used per sequence, s (paper: 3/6/9 "
                                 "of 12). Required.")
    num_layers: Int | None = Field(None, ge=1, description="Gated layers L; checked against the model when given.")
    beta: NonNegativeReal = Field(1.0, description="Budget penalty weight (paper: 1); its unit is beta_unit.")
    beta_unit: Literal["layers", "fraction"] = Field(
        "layers", description="'layers' (default): beta (mean layers used - k)^2, one layer of overshoot costs beta, "
        "so the paper's beta = 1 constrains the budget; 'fraction': beta (mean g - k/L)^2, the same penalty "
        "divided by L^2 (one layer of overshoot costs beta/144 at L=12).")
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
