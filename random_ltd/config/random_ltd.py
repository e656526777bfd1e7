"""Typed, validated random-LTD configuration, drop-in compatible with DeepSpeed's JSON block.

DeepSpeed (0.19.8) reads ``data_efficiency.data_routing.random_ltd`` as an untyped dict: no defaults, no type
checks, parent ``enabled`` flags ignored, a missing key fails with ``KeyError`` deep inside training. This module
parses exactly the same block into pydantic models and fails early with a :class:`ConfigError` whose message holds
the full key path, the bad value and what is allowed, e.g.::

    data_efficiency.data_routing.random_ltd.random_ltd_schedule.min_value: 4096 > max_value 2048 (...)

A config written for DeepSpeed's random-LTD loads unchanged. Differences from DeepSpeed, on purpose:

* ``enabled`` is true only if ``data_efficiency.enabled``, ``data_efficiency.data_routing.enabled`` (both default
  false, as in DeepSpeed's constants.py) and ``random_ltd.enabled`` are all true. DeepSpeed 0.19.8 only looks at
  ``random_ltd.enabled``; when the flags disagree we disable random-LTD and warn.
* Unknown keys are errors (DeepSpeed silently ignores typos such as ``require_step``). The keys DeepSpeed's engine
  injects into its own parsed copy (``global_batch_size``, ``micro_batch_size``) are not user keys and are rejected.
  The same holds in the two parents (``data_efficiency``: enabled, seed, data_sampling, data_routing;
  ``data_routing``: enabled, random_ltd), and a top-level key that looks like a misspelled or misplaced path segment
  (``data_efficency``, ``random-ltd``) is an error while the real one is missing: it would switch random-LTD off.
* Files are read as ``deepspeed.initialize`` reads them (Hjson comments allowed, duplicate keys rejected); an
  unreadable file is a ConfigError naming it.
* ``seed`` is in ``[0, 2**63 - 1]`` (``random_ltd.seeds``) and ``total_layer_num`` at most ``MAX_LAYERS`` (2**16).
* Without its own ``lr``, LayerToken LR's ``min_lr`` must not exceed ``optimizer.params.lr`` when the config has one.
* When the block is disabled (by its own flag or a parent's) nothing else is required, but whatever is present is
  still type-checked.
* ``fixed_linear`` with ``min_value < seq_per_step`` is rejected (DeepSpeed's round-down would keep 0 tokens), and
  an enabled ``layer_token_lr_schedule`` must use ``warmup_type`` ``"linear"`` (``"log"`` has no layer-token form).

Extensions (all optional; a DeepSpeed config never needs them):

======================================================  ==============================================================
Key (relative to ``...random_ltd``)                     Meaning
======================================================  ==============================================================
``random_ltd_schedule.schedule_type``                   ``"fixed_linear"`` (DeepSpeed: by optimizer step),
                                                        ``"fixed_linear_tokens"`` (by consumed training tokens) or
                                                        ``"constant"`` (kept length fixed at ``min_value``).
``random_ltd_schedule.schedule_config.require_tokens``  ``fixed_linear_tokens`` only: training tokens after which
                                                        the full ``max_value`` is kept (paper GPT recipe: 210e9).
``layer_keep_ratios``                                   ``{layer_id: ratio in (0, 1]}``: that layer keeps
                                                        ``max(1, floor(ratio * scheduled_kept))`` tokens.
``seed``                                                Base seed for index sampling, in ``[0, 2**63 - 1]`` (default
                                                        ``data_efficiency.seed`` if given, else 1234, DeepSpeed's
                                                        data-efficiency default).
``layer_token_lr_schedule.decay_type``                  ``"cosine"`` (default), ``"linear"`` or ``"constant"``.
``layer_token_lr_schedule.min_lr``                      LR reached at ``total_layer_tokens`` (default 0).
top-level ``scheduler`` with ``"type": "LayerTokenLR"``  The same LayerToken LR fields (+ optional peak ``lr``) in its
                                                        ``params`` (DeepSpeed's scheduler-block form); see
                                                        :func:`layer_token_lr_config_from_deepspeed`.
======================================================  ==============================================================

Defaults where DeepSpeed has none follow the paper: ``min_value`` 128, ``seq_per_step`` 16, ``schedule_type``
``fixed_linear``, ``random_ltd_layer_id`` = all but the first and last layer (``1 .. L-2``), ``random_ltd_layer_num``
= ``len(random_ltd_layer_id)``.
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from typing import Any, ClassVar, Literal

from pydantic import Field, StrictBool, StrictStr, model_validator

from random_ltd.config.common import (
    MAX_LAYERS,
    RANDOM_LTD_PATH,
    ConfigError,
    ConfigIssue,
    Int,
    KeepRatio,
    LayerKey,
    Real,
    Seed,
    _as_int,
    _as_seed,
    _Block,
    _brief,
    _duplicates,
    _FieldIssues,
    _flag,
    _sub_block,
    load_deepspeed_config,
)
from random_ltd.config.layer_token_lr import (
    LAYER_TOKEN_LR_SCHEDULER_TYPE,
    SCHEDULER_PARAMS_PATH,
    LayerTokenLRConfig,
    LayerTokenLRSchedule,
)

__all__ = [
    "RANDOM_LTD_PATH",
    "LayerSet",
    "RandomLTDConfig",
    "ScheduleConfig",
    "ScheduleParams",
    "TokenBypassConfig",
    "layer_set_ids",
    "layer_token_lr_config_from_deepspeed",
]

# DeepSpeed's data_pipeline/constants.py defaults.
_DATA_EFFICIENCY_ENABLED_DEFAULT = False
_DATA_ROUTING_ENABLED_DEFAULT = False
_DATA_EFFICIENCY_SEED_DEFAULT = 1234

#: Keys DeepSpeed 0.19.8 reads in the two parents of the random-LTD block (data_pipeline/constants.py and config.py);
#: anything else there is a typo that DeepSpeed ignores. ``data_sampling``'s contents (curriculum_learning,
#: dynamic_batching, ...) belong to DeepSpeed and are not checked here.
_PARENT_KEYS: dict[str, tuple[str, ...]] = {
    "data_efficiency": ("enabled", "seed", "data_sampling", "data_routing"),
    "data_efficiency.data_routing": ("enabled", "random_ltd"),
}
#: Where each segment of the random-LTD path lives, to name the right place for a misspelled or misplaced block.
_SEGMENT_HOME = {"data_efficiency": "data_efficiency", "data_routing": "data_efficiency.data_routing",
                 "random_ltd": RANDOM_LTD_PATH}


# --------------------------------------------------------------------------------------------------------------------
# random_ltd_schedule
# --------------------------------------------------------------------------------------------------------------------

ScheduleType = Literal["fixed_linear", "fixed_linear_tokens", "constant"]
HiddenStateOrder = Literal["seq_batch_dim", "batch_seq_dim"]
"""``hidden_state_order``: ``[s, b, h]`` (Megatron) or ``[b, s, h]`` (HF)."""


class ScheduleParams(_Block):
    """``random_ltd_schedule.schedule_config``: how fast the kept length grows."""

    _path: ClassVar[str] = RANDOM_LTD_PATH + ".random_ltd_schedule.schedule_config"

    require_steps: Int | None = Field(
        None,
        ge=1,
        description="fixed_linear: optimizer steps after which the kept length reaches max_value "
        "(DeepSpeed key; e.g. 200000 for GPT-3 1.3B on 300B tokens). Required for fixed_linear.",
    )
    seq_per_step: Int = Field(
        16,
        ge=1,
        description="Granularity of growth: the kept length is rounded down to a multiple of this (DeepSpeed key; "
        "paper: 16).",
    )
    require_tokens: Int | None = Field(
        None,
        ge=1,
        description="Extension, fixed_linear_tokens only: consumed training tokens (samples x seq_len) after which "
        "max_value is kept (paper GPT recipe: 210e9). Required for fixed_linear_tokens.",
    )


class ScheduleConfig(_Block):
    """``random_ltd_schedule``: Monotonic Sequence Length Growth (MSLG) of the kept token count."""

    _path: ClassVar[str] = RANDOM_LTD_PATH + ".random_ltd_schedule"

    min_value: Int = Field(128, ge=1, description="Kept tokens at the start of training (DeepSpeed key; paper: 128).")
    max_value: Int | None = Field(
        None,
        ge=1,
        description="Kept tokens at the end of growth, normally the full sequence length (DeepSpeed key; GPT 2048, "
        "BERT 512). Required when random-LTD is enabled.",
    )
    schedule_type: ScheduleType = Field(
        "fixed_linear",
        description="'fixed_linear': DeepSpeed's linear growth by optimizer step; 'fixed_linear_tokens' "
        "(extension): the same growth driven by consumed training tokens; 'constant' (extension): always "
        "min_value.",
    )
    schedule_config: ScheduleParams = Field(
        default_factory=ScheduleParams, description="Growth speed and granularity (DeepSpeed key)."
    )

    @model_validator(mode="after")
    def _check_min_le_max(self) -> ScheduleConfig:
        """min_value must not exceed max_value."""
        if self.max_value is not None and self.min_value > self.max_value:
            raise _FieldIssues(
                ("min_value", f"{self.min_value} > max_value {self.max_value} (min_value must be <= max_value)")
            )
        return self

    @model_validator(mode="after")
    def _check_min_vs_granularity(self) -> ScheduleConfig:
        """fixed_linear rounds down to multiples of seq_per_step, so min_value < seq_per_step would keep 0 tokens."""
        step = self.schedule_config.seq_per_step
        if self.schedule_type == "fixed_linear" and self.min_value < step:
            raise _FieldIssues(
                (
                    "min_value",
                    f"{self.min_value} < schedule_config.seq_per_step {step}: fixed_linear rounds the kept length "
                    f"down to a multiple of seq_per_step (DeepSpeed's formula), so training would start with 0 kept "
                    f"tokens; use min_value >= {step} or a smaller seq_per_step",
                )
            )
        return self

    @model_validator(mode="after")
    def _check_params_match_type(self) -> ScheduleConfig:
        """Each growth parameter belongs to one schedule type; a mismatch is almost certainly a mistake."""
        params = self.schedule_config
        if self.schedule_type == "fixed_linear" and params.require_tokens is not None:
            raise _FieldIssues(
                (
                    "schedule_config.require_tokens",
                    f"{params.require_tokens} is only allowed with schedule_type 'fixed_linear_tokens' "
                    f"(schedule_type is 'fixed_linear', which uses require_steps)",
                )
            )
        if self.schedule_type == "fixed_linear_tokens" and params.require_steps is not None:
            raise _FieldIssues(
                (
                    "schedule_config.require_steps",
                    f"{params.require_steps} is only allowed with schedule_type 'fixed_linear' "
                    f"(schedule_type is 'fixed_linear_tokens', which uses require_tokens)",
                )
            )
        return self


# --------------------------------------------------------------------------------------------------------------------
# random_ltd block
# --------------------------------------------------------------------------------------------------------------------


class RandomLTDConfig(_Block):
    """The ``data_efficiency.data_routing.random_ltd`` block (DeepSpeed schema plus documented extensions).

    Build it from a whole DeepSpeed config with :meth:`from_deepspeed` (honours the parent ``enabled`` flags), or
    from the block alone with ``RandomLTDConfig.model_validate(block)`` / ``RandomLTDConfig(**block)``.
    """

    enabled: StrictBool = Field(False, description="Turn random-LTD on (DeepSpeed key; default false).")
    total_layer_num: Int | None = Field(
        None, ge=1, le=MAX_LAYERS,
        description=f"L, number of transformer layers in the model, at most {MAX_LAYERS} (DeepSpeed key). Required "
        "when enabled.",
    )
    random_ltd_layer_num: Int | None = Field(
        None,
        ge=0,
        description="n, number of layers that drop tokens (DeepSpeed key); default len(random_ltd_layer_id); must "
        "equal it.",
    )
    random_ltd_layer_id: list[Int] | None = Field(
        None,
        description="Indices in [0, L) of the layers that drop tokens, unique, any order (DeepSpeed key); default "
        "1..L-2, i.e. all but the first and last layer (paper, Table 5).",
    )
    model_mask_name: StrictStr | None = Field(
        None, description="Keyword name of the attention mask in the layer's forward, or null (DeepSpeed key)."
    )
    model_type: Literal["decoder", "encoder"] = Field(
        "decoder", description="'decoder' (causal, GPT) or 'encoder' (bidirectional, BERT/ViT) (DeepSpeed key)."
    )
    hidden_state_order: HiddenStateOrder = Field(
        "batch_seq_dim",
        description="Layout of hidden states: 'seq_batch_dim' [S, B, H] (Megatron) or 'batch_seq_dim' [B, S, H] "
        "(HF) (DeepSpeed key; DeepSpeed has no default, ours is PyTorch/HF's).",
    )
    random_ltd_schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="MSLG schedule of the kept token count (DeepSpeed key)."
    )
    layer_token_lr_schedule: LayerTokenLRSchedule = Field(
        default_factory=LayerTokenLRSchedule,
        description="LayerToken LR (DeepSpeed key; declared but unimplemented in DeepSpeed, implemented here).",
    )
    layer_keep_ratios: dict[LayerKey, KeepRatio] | None = Field(
        None,
        description="Extension: {layer_id: ratio in (0, 1]}; that layer keeps max(1, floor(ratio * scheduled kept)) "
        "tokens instead of the shared count (the paper's 'same ratio for all layers' limitation). Keys must be in "
        "random_ltd_layer_id.",
    )
    seed: Seed = Field(
        _DATA_EFFICIENCY_SEED_DEFAULT,
        description="Extension: base seed for token-index sampling, an integer in [0, 2**63 - 1] (larger ones "
        "would alias smaller ones); from_deepspeed defaults it to data_efficiency.seed (DeepSpeed's key, default "
        "1234).",
    )
    layer_set: LayerSet | None = Field(
        None,
        description="Extension (ablations, paper Table 5): name the dropping layers instead of listing them: 'all', "
        "'all_but_first', 'all_but_last', 'all_but_first_and_last' (= the default), or 'sandwich' (TokenBypass: "
        "layers L//2 .. L-2, the first half and the last layer full). Resolved into random_ltd_layer_id; giving "
        "both is an error unless they agree.",
    )
    token_bypass: TokenBypassConfig = Field(
        default_factory=lambda: TokenBypassConfig(),
        description="Extension (ablation baseline, paper section 5.1): TokenBypass (Hou et al. 2022) instead of "
        "random selection. Default dropping layers when enabled: layer_set 'sandwich'.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_layer_defaults(cls, data: Any) -> Any:
        """Default the dropping layers to 1..L-2 and n to their count (paper defaults; DeepSpeed has none)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        try:
            num_layers = _as_int(data.get("total_layer_num"))
        except ValueError:
            num_layers = None  # missing or malformed: reported by field validation
        if num_layers is not None and not 1 <= num_layers <= MAX_LAYERS:
            return data  # out of range: reported by field validation, and no default list of that size is built
        data = _resolve_layer_set(data, num_layers)
        if data.get("random_ltd_layer_id") is None and num_layers is not None and num_layers >= 3:
            data["random_ltd_layer_id"] = list(range(1, num_layers - 1))
        if data.get("random_ltd_layer_num") is None and isinstance(data.get("random_ltd_layer_id"), list):
            data["random_ltd_layer_num"] = len(data["random_ltd_layer_id"])
        return data

    @model_validator(mode="after")
    def _check_required_when_enabled(self) -> RandomLTDConfig:
        """An enabled block needs L, the dropping layers, max_value and the growth length for its schedule type."""
        if not self.enabled:
            return self
        missing = []
        if self.total_layer_num is None:
            missing.append(("total_layer_num", "required when random-LTD is enabled"))
        elif self.random_ltd_layer_id is None:
            missing.append(
                ("random_ltd_layer_id", "required when total_layer_num < 3 (the default is layers 1..L-2)")
            )
        schedule = self.random_ltd_schedule
        if schedule.max_value is None:
            missing.append(("random_ltd_schedule.max_value", "required when random-LTD is enabled"))
        if schedule.schedule_type == "fixed_linear" and schedule.schedule_config.require_steps is None:
            missing.append(
                ("random_ltd_schedule.schedule_config.require_steps", "required for schedule_type 'fixed_linear'")
            )
        if schedule.schedule_type == "fixed_linear_tokens" and schedule.schedule_config.require_tokens is None:
            missing.append(
                (
                    "random_ltd_schedule.schedule_config.require_tokens",
                    "required for schedule_type 'fixed_linear_tokens'",
                )
            )
        if missing:
            raise _FieldIssues(*missing)
        return self

    @model_validator(mode="after")
    def _check_layer_ids(self) -> RandomLTDConfig:
        """Layer ids must be unique and inside [0, L)."""
        ids = self.random_ltd_layer_id
        if ids is None:
            return self
        problems = []
        duplicates = _duplicates(ids)
        if duplicates:
            problems.append(("random_ltd_layer_id", f"duplicate layer ids {_brief(duplicates)} in {_brief(ids)} "
                             "(must be unique)"))
        num_layers = self.total_layer_num
        high = num_layers if num_layers is not None else MAX_LAYERS
        outside = [i for i in ids if not 0 <= i < high]
        if outside:
            why = f"total_layer_num is {num_layers}" if num_layers is not None else \
                f"at most MAX_LAYERS = {MAX_LAYERS} layers"
            problems.append(("random_ltd_layer_id", f"layer ids {_brief(outside)} outside [0, {high}) ({why})"))
        if problems:
            raise _FieldIssues(*problems)
        return self

    @model_validator(mode="after")
    def _check_layer_num(self) -> RandomLTDConfig:
        """n must equal the number of listed layers (DeepSpeed uses both and silently miscounts if they differ)."""
        n, ids = self.random_ltd_layer_num, self.random_ltd_layer_id
        if n is not None and ids is not None and n != len(ids):
            raise _FieldIssues(
                (
                    "random_ltd_layer_num",
                    f"{n} != len(random_ltd_layer_id) {len(ids)} (must equal the number of listed layer ids)",
                )
            )
        if n is not None and ids is None:
            raise _FieldIssues(
                ("random_ltd_layer_id", f"required when random_ltd_layer_num ({n}) is given without total_layer_num")
            )
        return self

    @model_validator(mode="after")
    def _check_keep_ratio_layers(self) -> RandomLTDConfig:
        """Per-layer ratios only make sense for layers that drop tokens."""
        ratios = self.layer_keep_ratios
        if not ratios:
            return self
        ids = set(self.random_ltd_layer_id or ())
        stray = sorted(k for k in ratios if k not in ids)
        if stray:
            raise _FieldIssues(
                (
                    "layer_keep_ratios",
                    f"layer ids {stray} are not random-LTD layers; allowed keys: random_ltd_layer_id "
                    f"{sorted(ids)}",
                )
            )
        return self

    @model_validator(mode="after")
    def _check_token_bypass(self) -> RandomLTDConfig:
        """TokenBypass needs one shared kept set over a consecutive run of layers (the bypassed block)."""
        if not self.token_bypass.enabled:
            return self
        if self.layer_keep_ratios:
            raise _FieldIssues(("layer_keep_ratios", "not supported with token_bypass (every bypassed layer keeps "
                                "the same tokens, so all must keep the same count)"))
        ids = sorted(self.random_ltd_layer_id or ())
        if ids and ids != list(range(ids[0], ids[-1] + 1)):
            raise _FieldIssues(("random_ltd_layer_id", f"{ids} is not a consecutive run of layers, which "
                                "token_bypass needs (dropped tokens bypass one block of layers)"))
        return self

    # ---- convenience -------------------------------------------------------------------------------------------

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """Random-LTD layer ids in ascending order (empty when not configured)."""
        return tuple(sorted(self.random_ltd_layer_id or ()))

    @property
    def num_full_layers(self) -> int:
        """Layers that always see the full sequence (L - n)."""
        return (self.total_layer_num or 0) - len(self.random_ltd_layer_id or ())

    def keep_ratio(self, layer_id: int) -> float:
        """The extra keep ratio of one layer (1.0 when not set)."""
        return (self.layer_keep_ratios or {}).get(layer_id, 1.0)

    @classmethod
    def from_deepspeed(cls, ds_config: dict[str, Any] | str | os.PathLike[str]) -> RandomLTDConfig:
        """Read the random-LTD block from a whole DeepSpeed config (a dict or a path to a JSON file).

        A missing block gives a disabled config. ``enabled`` is true only if ``data_efficiency.enabled``,
        ``data_efficiency.data_routing.enabled`` and ``random_ltd.enabled`` all are (DeepSpeed defaults: false).

        Raises:
            ConfigError: an invalid block; an unknown key in ``data_efficiency`` or ``data_efficiency.data_routing``
                (DeepSpeed ignores those); a top-level key that looks like a misspelled or misplaced segment of
                the random-LTD path (``data_efficency``, ``random-ltd``) while the real one is missing, which would
                otherwise switch random-LTD off without a word.
        """
        ds = load_deepspeed_config(ds_config)
        data_efficiency = _sub_block(ds, "data_efficiency", "")
        data_routing = _sub_block(data_efficiency, "data_routing", "data_efficiency")
        _check_block_names(ds, data_efficiency, data_routing)
        de_on = _flag(data_efficiency, "data_efficiency", _DATA_EFFICIENCY_ENABLED_DEFAULT)
        dr_on = _flag(data_routing, "data_efficiency.data_routing", _DATA_ROUTING_ENABLED_DEFAULT)
        block = data_routing.get("random_ltd")
        if block is None:
            return cls()
        if not isinstance(block, dict):
            raise ConfigError([ConfigIssue(RANDOM_LTD_PATH, f"expected an object, got {block!r}")])
        if "seed" not in block and "seed" in data_efficiency:
            seed = data_efficiency["seed"]
            try:
                block = {**block, "seed": _as_seed(seed)}
            except ValueError as exc:
                raise ConfigError([ConfigIssue("data_efficiency.seed", str(exc))]) from None
        if block.get("enabled") is True and not (de_on and dr_on):
            off = [name for name, on in (("data_efficiency", de_on), ("data_efficiency.data_routing", dr_on)) if not on]
            warnings.warn(
                f"{RANDOM_LTD_PATH}.enabled is true but {' and '.join(f'{p}.enabled' for p in off)} is false or "
                f"missing (DeepSpeed default false): random-LTD is disabled. Note that DeepSpeed 0.19.8 ignores "
                f"the parent flags and would enable it.",
                UserWarning,
                stacklevel=2,
            )
            block = {**block, "enabled": False}  # validated as a disabled block: nothing else is required
        return cls.model_validate(block)


def _near(key: Any, names: tuple[str, ...]) -> str | None:
    """The name in ``names`` that ``key`` most likely misspells (case, '-' for '_', a letter or two), or None."""
    norm = str(key).strip().lower().replace("-", "_").replace(" ", "_")
    match = difflib.get_close_matches(norm, names, n=1, cutoff=0.8)
    return match[0] if match else None


def _check_block_names(ds: dict[str, Any], data_efficiency: dict[str, Any], data_routing: dict[str, Any]) -> None:
    """Refuse names that would silently switch random-LTD off: typos of the path segments and unknown parent keys."""
    segments = tuple(_SEGMENT_HOME)
    present = {"data_efficiency": "data_efficiency" in ds, "data_routing": "data_routing" in data_efficiency,
               "random_ltd": "random_ltd" in data_routing}
    issues = []
    for key in ds:
        name = None if key == "data_efficiency" else _near(key, segments)
        if name is not None and not present[name]:
            issues.append(ConfigIssue(str(key), f"unknown top-level key {key!r} looks like {name!r}, whose place "
                                      f"{_SEGMENT_HOME[name]} is missing: as written random-LTD is off (DeepSpeed "
                                      f"ignores the key); rename or move it"))
    for path, parent in (("data_efficiency", data_efficiency), ("data_efficiency.data_routing", data_routing)):
        allowed = _PARENT_KEYS[path]
        for key in parent:
            if key in allowed:
                continue
            name = _near(key, allowed + segments)
            if name in allowed:
                hint = f" (did you mean {name!r}?)"
            elif name is not None:
                hint = f" ({name!r} belongs at {_SEGMENT_HOME[name]})"
            else:
                hint = ""
            issues.append(ConfigIssue(f"{path}.{key}", f"unknown key {key!r}{hint}; DeepSpeed reads only "
                                      f"{', '.join(allowed)} here"))
    if issues:
        raise ConfigError(issues)


def layer_token_lr_config_from_deepspeed(
    ds_config: dict[str, Any] | str | os.PathLike[str],
) -> LayerTokenLRConfig | None:
    """The enabled LayerToken LR settings of a DeepSpeed config, or None.

    Two places may hold them: the top-level ``"scheduler": {"type": "LayerTokenLR", "params": {...}}`` block, or
    ``data_efficiency.data_routing.random_ltd.layer_token_lr_schedule`` (counted only while random-LTD itself is
    enabled, as in DeepSpeed). Enabling both is an error naming both paths.
    """
    ds = load_deepspeed_config(ds_config)
    from_scheduler: LayerTokenLRConfig | None = None
    scheduler = ds.get("scheduler")
    if isinstance(scheduler, dict) and scheduler.get("type") == LAYER_TOKEN_LR_SCHEDULER_TYPE:
        params = scheduler.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError([ConfigIssue(SCHEDULER_PARAMS_PATH, f"expected an object, got {params!r}")])
        candidate = LayerTokenLRConfig.model_validate(params)
        if candidate.enabled:
            from_scheduler = candidate

    from_block: LayerTokenLRConfig | None = None
    with warnings.catch_warnings():  # the parent-flag warning belongs to RandomLTDConfig.from_deepspeed's caller
        warnings.simplefilter("ignore", UserWarning)
        random_ltd = RandomLTDConfig.from_deepspeed(ds)
    block = random_ltd.layer_token_lr_schedule
    if block.enabled and random_ltd.enabled:
        from_block = block.to_lr_config()
    elif block.enabled:
        warnings.warn(
            f"{RANDOM_LTD_PATH}.layer_token_lr_schedule.enabled is true but random-LTD is disabled, so it is ignored; "
            f"use the 'scheduler': {{'type': '{LAYER_TOKEN_LR_SCHEDULER_TYPE}'}} form for LayerToken LR without "
            f"random-LTD",
            UserWarning,
            stacklevel=2,
        )

    if from_scheduler is not None and from_block is not None:
        raise ConfigError(
            [
                ConfigIssue(
                    SCHEDULER_PARAMS_PATH,
                    f"LayerToken LR is enabled twice: in 'scheduler' (type {LAYER_TOKEN_LR_SCHEDULER_TYPE}) and in "
                    f"{RANDOM_LTD_PATH}.layer_token_lr_schedule; keep exactly one",
                )
            ]
        )
    if from_scheduler is not None:
        _check_min_lr_vs_optimizer(ds, from_scheduler, SCHEDULER_PARAMS_PATH)
        return from_scheduler
    if from_block is not None:
        _check_min_lr_vs_optimizer(ds, from_block, f"{RANDOM_LTD_PATH}.layer_token_lr_schedule")
    return from_block


def _check_min_lr_vs_optimizer(ds: dict[str, Any], config: LayerTokenLRConfig, path: str) -> None:
    """Without its own ``lr`` the schedule decays from the optimizer's LR: ``min_lr`` above it fails only later,
    inside ``initialize``, so check it here when the DeepSpeed config has an ``optimizer.params.lr``."""
    if config.lr is not None or config.decay_type == "constant":
        return  # the peak is the schedule's own lr (checked by the model), or min_lr is unused
    optimizer = ds.get("optimizer")
    params = optimizer.get("params") if isinstance(optimizer, dict) else None
    lr = params.get("lr") if isinstance(params, dict) else None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        return  # absent, "auto" (HF) or malformed: DeepSpeed reports its own block
    if config.min_lr > lr:
        raise ConfigError([ConfigIssue(f"{path}.min_lr", f"{config.min_lr} > optimizer.params.lr {lr}: LayerToken LR "
                                       "decays from the optimizer's lr (the peak) down to min_lr, so min_lr must be "
                                       "<= it")])


# --------------------------------------------------------------------------------------------------------------------
# Ablation options: named layer sets and TokenBypass (paper sections 5.1 and 5.3, Table 5)
# --------------------------------------------------------------------------------------------------------------------

LayerSet = Literal["all", "all_but_first", "all_but_last", "all_but_first_and_last", "sandwich"]


def layer_set_ids(layer_set: str, num_layers: int) -> list[int]:
    """The layer ids a named ``layer_set`` stands for in a model of ``num_layers`` layers.

    Raises:
        ValueError: unknown name, or a set that is empty for this depth.
    """
    sets = {
        "all": range(0, num_layers),
        "all_but_first": range(1, num_layers),
        "all_but_last": range(0, num_layers - 1),
        "all_but_first_and_last": range(1, num_layers - 1),
        "sandwich": range(num_layers // 2, num_layers - 1),
    }
    if layer_set not in sets:
        raise ValueError(f"unknown layer_set {layer_set!r}; allowed: {', '.join(sets)}")
    ids = list(sets[layer_set])
    if not ids:
        raise ValueError(f"layer_set {layer_set!r} is empty for total_layer_num {num_layers}")
    return ids


def _resolve_layer_set(data: dict[str, Any], num_layers: int | None) -> dict[str, Any]:
    """Fill random_ltd_layer_id from layer_set (or 'sandwich' for an enabled token_bypass); check they agree."""
    layer_set = data.get("layer_set")
    bypass = data.get("token_bypass")
    if layer_set is None and isinstance(bypass, dict) and bypass.get("enabled") is True \
            and data.get("random_ltd_layer_id") is None:
        layer_set = "sandwich"
    if not isinstance(layer_set, str):
        return data  # None, or a wrong type reported by field validation
    if num_layers is None:
        raise _FieldIssues(("layer_set", f"{layer_set!r} needs total_layer_num"))
    try:
        ids = layer_set_ids(layer_set, num_layers)
    except ValueError as exc:
        raise _FieldIssues(("layer_set", str(exc))) from None
    given = data.get("random_ltd_layer_id")
    if given is not None:
        if isinstance(given, list) and sorted(given) == ids:
            return data
        raise _FieldIssues(("random_ltd_layer_id", f"{given!r} disagrees with layer_set {layer_set!r} = {ids} "
                            "(give one of them)"))
    return {**data, "random_ltd_layer_id": ids}


class TokenBypassConfig(_Block):
    """``random_ltd.token_bypass``: the TokenBypass baseline (Hou et al. 2022; paper section 2, Appendix B).

    The kept tokens are not random: they are the tokens whose vocabulary id has the highest moving average of
    per-token loss (plus every special token), the same set in every dropping layer of a micro-batch, so the dropped
    group bypasses the whole block of layers. The kept count comes from ``random_ltd_schedule`` (the paper uses
    ``constant`` at s/2). The training loop feeds the loss: ``state.update(input_ids, per_token_loss)``.
    """

    _path: ClassVar[str] = RANDOM_LTD_PATH + ".token_bypass"

    enabled: StrictBool = Field(False, description="Use TokenBypass selection instead of random selection.")
    moving_average: Real = Field(
        0.9, ge=0.0, lt=1.0,
        description="beta of the per-id score: score = beta * score + (1 - beta) * mean loss of that id in the "
        "micro-batch (ids not in the micro-batch keep their score; an id's first observation sets it).",
    )
    special_token_ids: list[Int] = Field(
        default_factory=list,
        description="Vocabulary ids that are never dropped (Hou et al.: [CLS], [SEP], [MASK]).",
    )
    input_ids_name: StrictStr = Field(
        "input_ids",
        description="Keyword name of the token ids in the model's forward; when not passed by keyword, the first "
        "positional argument is used.",
    )

    @model_validator(mode="after")
    def _check_special_ids(self) -> TokenBypassConfig:
        """Special ids are vocabulary ids: non-negative."""
        bad = [i for i in self.special_token_ids if i < 0]
        if bad:
            raise _FieldIssues(("special_token_ids", f"{bad} are negative (vocabulary ids are >= 0)"))
        return self


RandomLTDConfig.model_rebuild()
