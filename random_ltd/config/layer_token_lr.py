"""LayerToken LR settings: the ``random_ltd.layer_token_lr_schedule`` block and the ``scheduler`` block form."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, StrictBool, model_validator

from random_ltd.config.common import RANDOM_LTD_PATH, Int, Real, _Block, _FieldIssues

__all__ = ["LAYER_TOKEN_LR_SCHEDULER_TYPE", "SCHEDULER_PARAMS_PATH", "LayerTokenLRConfig", "LayerTokenLRSchedule"]

SCHEDULER_PARAMS_PATH = "scheduler.params"
"""Dotted key path of the LayerToken LR parameters in the DeepSpeed ``scheduler`` block form."""

LAYER_TOKEN_LR_SCHEDULER_TYPE = "LayerTokenLR"
"""Value of ``scheduler.type`` that selects LayerToken LR in a DeepSpeed config."""


WarmupType = Literal["linear", "log"]
DecayType = Literal["linear", "cosine", "constant"]


class _LayerTokenLRFields(_Block):
    """Fields shared by the random-LTD block form and the ``scheduler`` block form of LayerToken LR."""

    enabled: StrictBool = Field(description="Turn LayerToken LR on (default set by each form).")
    total_layer_tokens: Int | None = Field(
        None,
        ge=1,
        description="Layer-tokens (sum over layers of tokens processed) at which the decay ends and min_lr is "
        "reached (DeepSpeed key). Appendix C eq. (2): the random-LTD run's total consumption. Required when "
        "enabled.",
    )
    warmup_layer_tokens: Int = Field(
        0,
        ge=0,
        description="Layer-tokens of linear warmup from 0 to the peak LR (DeepSpeed key). Appendix C eq. (1): "
        "L * seq_len * batch * warmup_steps of the iteration-based schedule being replaced.",
    )
    warmup_type: WarmupType = Field(
        "linear",
        description="Warmup shape (DeepSpeed key). Only 'linear' is implemented: DeepSpeed's 'log' warmup is "
        "log(step+1)/log(warmup_steps), which has no step unit in layer-token space; 'log' is accepted only in a "
        "disabled block so DeepSpeed configs still load.",
    )
    decay_type: DecayType = Field(
        "cosine",
        description="Extension: decay shape after warmup: 'cosine' (default), 'linear', or 'constant' (stay at the "
        "peak LR; min_lr unused).",
    )
    min_lr: Real = Field(0.0, ge=0.0, description="Extension: LR reached at total_layer_tokens and kept after it.")

    @model_validator(mode="after")
    def _check_required_when_enabled(self) -> _LayerTokenLRFields:
        """total_layer_tokens has no sensible default; require it when the schedule is on."""
        if self.enabled and self.total_layer_tokens is None:
            raise _FieldIssues(("total_layer_tokens", "required when the LayerToken LR schedule is enabled"))
        return self

    @model_validator(mode="after")
    def _check_warmup_within_total(self) -> _LayerTokenLRFields:
        """Warmup must end no later than the decay does."""
        if self.enabled and self.total_layer_tokens is not None and self.warmup_layer_tokens > self.total_layer_tokens:
            raise _FieldIssues(
                (
                    "warmup_layer_tokens",
                    f"{self.warmup_layer_tokens} > total_layer_tokens {self.total_layer_tokens} (warmup must end "
                    f"no later than the decay)",
                )
            )
        return self

    @model_validator(mode="after")
    def _check_warmup_type_supported(self) -> _LayerTokenLRFields:
        """'log' warmup is declared by DeepSpeed but has no meaning in layer-token space."""
        if self.enabled and self.warmup_type != "linear":
            raise _FieldIssues(
                (
                    "warmup_type",
                    f"{self.warmup_type!r} is not supported for LayerToken LR; allowed: 'linear' (DeepSpeed's log "
                    f"warmup is log(step+1)/log(warmup_steps) and needs a step unit that layer-tokens do not have)",
                )
            )
        return self


class LayerTokenLRSchedule(_LayerTokenLRFields):
    """``random_ltd.layer_token_lr_schedule``: LayerToken LR declared inside the random-LTD block (DeepSpeed form).

    DeepSpeed 0.19.8 declares these keys but raises NotImplementedError when enabled; we implement them.
    """

    _path: ClassVar[str] = RANDOM_LTD_PATH + ".layer_token_lr_schedule"

    enabled: StrictBool = Field(False, description="Turn LayerToken LR on (DeepSpeed key; default false).")

    def to_lr_config(self, lr: float | None = None) -> LayerTokenLRConfig:
        """The same settings as a standalone :class:`LayerTokenLRConfig`."""
        return LayerTokenLRConfig(**self.model_dump(), lr=lr)


class LayerTokenLRConfig(_LayerTokenLRFields):
    """LayerToken LR settings, also the ``params`` of DeepSpeed's ``"scheduler": {"type": "LayerTokenLR"}`` form."""

    _path: ClassVar[str] = SCHEDULER_PARAMS_PATH

    enabled: StrictBool = Field(True, description="Turn LayerToken LR on (default true in the scheduler form).")
    lr: Real | None = Field(
        None, gt=0.0, description="Peak LR after warmup; default: each optimizer param group's initial lr."
    )

    @model_validator(mode="after")
    def _check_min_lr_below_peak(self) -> LayerTokenLRConfig:
        """The decay must go down, not up."""
        if self.lr is not None and self.min_lr > self.lr:
            raise _FieldIssues(("min_lr", f"{self.min_lr} > lr {self.lr} (min_lr must be <= the peak lr)"))
        return self
