"""Monotonic Sequence Length Growth (MSLG): how many tokens the random-LTD layers keep at each step.

Paper section 3.2: the kept length grows linearly from ``min_value`` to ``max_value``. Three schedule types:

* ``fixed_linear`` (DeepSpeed's): by optimizer step ``t`` (number of completed optimizer steps, 0 for the first),
  ``kept = min(max, r(floor(min + t / require_steps * (max - min))))`` where ``r`` rounds down to a multiple of
  ``seq_per_step``. Reproduced bit for bit from DeepSpeed 0.19.8 ``BaseScheduler.__fixed_root_get_value``
  (same float expression), including two quirks: the round-down is to absolute multiples, so a ``min_value`` that is
  not a multiple of ``seq_per_step`` starts *below* ``min_value`` (we warn); and a ``max_value`` that is not a
  multiple is reached only after ``require_steps``, once the unclamped value passes the next multiple.
* ``fixed_linear_tokens`` (ours): the same growth driven by consumed training tokens (samples x seq_len) over
  ``require_tokens``, in exact integer arithmetic: ``kept = min + seq_per_step * floor(tokens * (max - min) /
  (require_tokens * seq_per_step))``, and exactly ``max`` from ``require_tokens`` on. Steps are counted from
  ``min_value`` (the paper's "+16 every 1.75B tokens"), so the value never leaves ``[min, max]``. The paper's GPT
  recipe is ``min 128, max 2048, seq_per_step 16, require_tokens 210e9``.
* ``constant``: always ``min_value`` (ablations, paper Table 6).

Per-layer ratios (``layer_keep_ratios``) then give layer ``i`` ``max(1, floor(ratio_i * kept))`` tokens (exact:
the ratio is read as the decimal it was written as).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterator
from fractions import Fraction
from typing import Any, NamedTuple

from random_ltd.config import RANDOM_LTD_PATH, ConfigError, ConfigIssue, RandomLTDConfig

__all__ = [
    "MSLGSchedule",
    "PlanRow",
    "deepspeed_fixed_linear",
    "plan",
    "planned_layer_tokens",
    "schedule_snapshot",
    "token_linear",
    "total_saving",
]

_STATE_FORMAT = "random_ltd.mslg/1"


def deepspeed_fixed_linear(step: int, min_value: int, max_value: int, require_steps: int, seq_per_step: int) -> int:
    """DeepSpeed's ``fixed_linear`` kept length at optimizer step ``step``, bit for bit (same float expression)."""
    next_seq = float(step) / require_steps  # DeepSpeed raises this to 1.0 / root_degree = 1.0: an exact no-op.
    value = math.floor(next_seq * (max_value - min_value) + min_value)
    value -= value % seq_per_step
    return min(value, max_value)


def token_linear(tokens: int, min_value: int, max_value: int, require_tokens: int, seq_per_step: int) -> int:
    """Token-driven linear growth in exact integers: +seq_per_step from min_value, max_value at require_tokens."""
    if tokens >= require_tokens:
        return max_value
    increments = (tokens * (max_value - min_value)) // (require_tokens * seq_per_step)
    return min(min_value + increments * seq_per_step, max_value)


def _apply_ratio(kept: int, ratio: Fraction | None) -> int:
    """A layer's kept length under its keep ratio: floor(ratio * kept), at least 1."""
    if ratio is None:
        return kept
    return max(1, math.floor(ratio * kept))


def _as_count(value: Any, name: str) -> int:
    """A non-negative int (numpy/torch integer scalars accepted); anything else is a clear error."""
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    return count


def _require_complete(config: RandomLTDConfig) -> None:
    """A schedule needs L, the dropping layers, max_value and its growth length even if the block is disabled."""
    sched = config.random_ltd_schedule
    needed = {
        "total_layer_num": config.total_layer_num,
        "random_ltd_layer_id": config.random_ltd_layer_id,
        "random_ltd_schedule.max_value": sched.max_value,
    }
    if sched.schedule_type == "fixed_linear":
        needed["random_ltd_schedule.schedule_config.require_steps"] = sched.schedule_config.require_steps
    elif sched.schedule_type == "fixed_linear_tokens":
        needed["random_ltd_schedule.schedule_config.require_tokens"] = sched.schedule_config.require_tokens
    missing = [ConfigIssue(f"{RANDOM_LTD_PATH}.{key}", "required to build an MSLG schedule")
               for key, value in needed.items() if value is None]
    if missing:
        raise ConfigError(missing)


def schedule_snapshot(config: RandomLTDConfig) -> dict[str, Any]:
    """The config fields that determine the schedule and layer-token counts, flattened to dotted keys."""
    sched = config.random_ltd_schedule
    ratios = config.layer_keep_ratios
    return {
        "total_layer_num": config.total_layer_num,
        "random_ltd_layer_id": sorted(config.random_ltd_layer_id or []),
        "random_ltd_schedule.min_value": sched.min_value,
        "random_ltd_schedule.max_value": sched.max_value,
        "random_ltd_schedule.schedule_type": sched.schedule_type,
        "random_ltd_schedule.schedule_config.require_steps": sched.schedule_config.require_steps,
        "random_ltd_schedule.schedule_config.require_tokens": sched.schedule_config.require_tokens,
        "random_ltd_schedule.schedule_config.seq_per_step": sched.schedule_config.seq_per_step,
        "layer_keep_ratios": None if ratios is None else {str(k): ratios[k] for k in sorted(ratios)},
    }


class MSLGSchedule:
    """Kept-length schedule plus the run's layer-token accounting (one object per training run).

    ``kept_length``/``layer_kept_lengths``/``layer_tokens`` are pure functions of the config; ``record`` accumulates
    what was really consumed, once per optimizer step, and ``state_dict``/``load_state_dict`` checkpoint it.
    """

    def __init__(self, config: RandomLTDConfig) -> None:
        _require_complete(config)
        self.config = config
        sched = config.random_ltd_schedule
        self.schedule_type = sched.schedule_type
        self.min_value = sched.min_value
        self.max_value: int = sched.max_value  # type: ignore[assignment]  # checked by _require_complete
        self.seq_per_step = sched.schedule_config.seq_per_step
        self.require_steps = sched.schedule_config.require_steps
        self.require_tokens = sched.schedule_config.require_tokens
        self.num_layers: int = config.total_layer_num  # type: ignore[assignment]
        self.layer_ids: tuple[int, ...] = config.layer_ids
        self._ratios = {lid: Fraction(repr(r)) for lid, r in (config.layer_keep_ratios or {}).items()}
        self.step = 0
        self.consumed_layer_tokens = 0
        self.baseline_layer_tokens = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        if self.schedule_type == "fixed_linear" and self.min_value % self.seq_per_step:
            start = self.min_value - self.min_value % self.seq_per_step
            warnings.warn(
                f"random_ltd_schedule.min_value {self.min_value} is not a multiple of seq_per_step "
                f"{self.seq_per_step}: DeepSpeed's fixed_linear formula (reproduced exactly) rounds down, so the "
                f"kept length starts at {start}, below min_value. Use a multiple, or schedule_type "
                f"'fixed_linear_tokens', which never goes below min_value.",
                UserWarning,
                stacklevel=2,
            )

    # ---- pure schedule ---------------------------------------------------------------------------------------

    def kept_length(self, step: int, tokens: int | None = None) -> int:
        """Tokens kept by every random-LTD layer at optimizer step ``step`` (0-based).

        ``tokens`` (training tokens consumed before this step) drives ``fixed_linear_tokens`` and is ignored by the
        step-based types.
        """
        step = _as_count(step, "step")
        if self.schedule_type == "constant":
            return self.min_value
        if self.schedule_type == "fixed_linear":
            return deepspeed_fixed_linear(step, self.min_value, self.max_value, self.require_steps, self.seq_per_step)
        if tokens is None:
            raise ValueError("schedule_type 'fixed_linear_tokens' needs tokens= (training tokens consumed so far)")
        tokens = _as_count(tokens, "tokens")
        return token_linear(tokens, self.min_value, self.max_value, self.require_tokens, self.seq_per_step)

    def layer_kept_lengths(self, step: int, tokens: int | None = None) -> dict[int, int]:
        """Kept length per random-LTD layer id (ascending), with ``layer_keep_ratios`` applied."""
        kept = self.kept_length(step, tokens)
        return {lid: _apply_ratio(kept, self._ratios.get(lid)) for lid in self.layer_ids}

    def layer_tokens(self, step: int, batch_size: int, seq_len: int | None = None, tokens: int | None = None) -> int:
        """Planned layer-tokens of one optimizer step of ``batch_size`` samples of ``seq_len`` tokens.

        ``batch * (sum over random-LTD layers of min(kept_i, seq_len) + seq_len * (L - n))``; ``seq_len`` defaults
        to ``max_value``.
        """
        return self._step_layer_tokens(self.kept_length(step, tokens), batch_size, seq_len)

    def baseline_layer_tokens_per_step(self, batch_size: int, seq_len: int | None = None) -> int:
        """Layer-tokens of one step without dropping: ``batch * seq_len * L``."""
        seq = self.max_value if seq_len is None else _as_count(seq_len, "seq_len")
        return _as_count(batch_size, "batch_size") * seq * self.num_layers

    def _step_layer_tokens(self, kept: int, batch_size: int, seq_len: int | None) -> int:
        seq = self.max_value if seq_len is None else _as_count(seq_len, "seq_len")
        batch = _as_count(batch_size, "batch_size")
        dropped_layers = sum(min(_apply_ratio(kept, self._ratios.get(lid)), seq) for lid in self.layer_ids)
        return batch * (dropped_layers + seq * (self.num_layers - len(self.layer_ids)))

    # ---- run accounting --------------------------------------------------------------------------------------

    def record(self, consumed_layer_tokens: int, baseline_layer_tokens: int, samples: int, tokens: int) -> None:
        """Account one finished optimizer step with the real numbers (layer-tokens with and without dropping)."""
        consumed = _as_count(consumed_layer_tokens, "consumed_layer_tokens")
        baseline = _as_count(baseline_layer_tokens, "baseline_layer_tokens")
        samples = _as_count(samples, "samples")
        tokens = _as_count(tokens, "tokens")
        self.step += 1
        self.consumed_layer_tokens += consumed
        self.baseline_layer_tokens += baseline
        self.consumed_samples += samples
        self.consumed_tokens += tokens

    @property
    def saved_fraction(self) -> float:
        """Fraction of layer-tokens saved so far: ``1 - consumed / baseline`` (0 before any step)."""
        if self.baseline_layer_tokens == 0:
            return 0.0
        return 1.0 - self.consumed_layer_tokens / self.baseline_layer_tokens

    @property
    def current_kept_length(self) -> int:
        """Kept length for the next step (uses the recorded step and token counters)."""
        return self.kept_length(self.step, self.consumed_tokens)

    @property
    def current_layer_kept_lengths(self) -> dict[int, int]:
        """Per-layer kept lengths for the next step."""
        return self.layer_kept_lengths(self.step, self.consumed_tokens)

    def state_dict(self) -> dict[str, Any]:
        """Counters plus a snapshot of the schedule config (plain Python types; JSON- and torch.save-able)."""
        return {
            "format": _STATE_FORMAT,
            "step": self.step,
            "consumed_layer_tokens": self.consumed_layer_tokens,
            "baseline_layer_tokens": self.baseline_layer_tokens,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "config": schedule_snapshot(self.config),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters. If the checkpoint's schedule config differs, warn naming the changed fields.

        The *current* config wins (DeepSpeed silently lets the checkpoint's min/max override the new config; we
        do the opposite, because a config edit on resume is deliberate).
        """
        if "step" not in state_dict and "current_steps" in state_dict:
            raise ValueError(
                "this is DeepSpeed RandomLTDScheduler state (current_steps/current_value); it lacks the baseline, "
                "sample and token counters MSLGSchedule keeps, so it cannot be loaded"
            )
        keys = ("step", "consumed_layer_tokens", "baseline_layer_tokens", "consumed_samples", "consumed_tokens")
        missing = [k for k in (*keys, "config") if k not in state_dict]
        if missing:
            raise KeyError(f"MSLG state_dict is missing {missing}")
        counters = {k: _as_count(state_dict[k], k) for k in keys}
        saved, current = state_dict["config"], schedule_snapshot(self.config)
        changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if changed:
            details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            warnings.warn(
                f"MSLG checkpoint was saved with a different schedule config; the current config wins "
                f"(DeepSpeed would silently keep the checkpoint's values). Changed: {details}",
                UserWarning,
                stacklevel=2,
            )
        for key, value in counters.items():
            setattr(self, key, value)


# --------------------------------------------------------------------------------------------------------------------
# Planning (pure)
# --------------------------------------------------------------------------------------------------------------------


class PlanRow(NamedTuple):
    """One optimizer step of a planned run."""

    step: int
    tokens: int  # training tokens consumed before this step (drives fixed_linear_tokens)
    kept: int  # scheduled kept length (before per-layer ratios)
    layer_tokens: int
    baseline_layer_tokens: int
    cumulative_layer_tokens: int
    cumulative_baseline_layer_tokens: int


def _iter_plan(config: RandomLTDConfig, steps: int, batch_size: int, seq_len: int | None) -> Iterator[PlanRow]:
    schedule = MSLGSchedule(config)
    seq = schedule.max_value if seq_len is None else _as_count(seq_len, "seq_len")
    batch = _as_count(batch_size, "batch_size")
    baseline = schedule.baseline_layer_tokens_per_step(batch, seq)
    per_kept: dict[int, int] = {}
    cumulative = cumulative_baseline = 0
    for step in range(_as_count(steps, "steps")):
        tokens = step * batch * seq
        kept = schedule.kept_length(step, tokens)
        layer_tokens = per_kept.get(kept)
        if layer_tokens is None:
            layer_tokens = per_kept[kept] = schedule._step_layer_tokens(kept, batch, seq)
        cumulative += layer_tokens
        cumulative_baseline += baseline
        yield PlanRow(step, tokens, kept, layer_tokens, baseline, cumulative, cumulative_baseline)


def plan(config: RandomLTDConfig, steps: int, batch_size: int, seq_len: int | None = None) -> list[PlanRow]:
    """Per-step plan of a run of ``steps`` optimizer steps with a constant batch (for the CLI ``plan`` command)."""
    return list(_iter_plan(config, steps, batch_size, seq_len))


def planned_layer_tokens(
    config: RandomLTDConfig, steps: int, batch_size: int, seq_len: int | None = None
) -> tuple[int, int]:
    """Total planned ``(consumed, baseline)`` layer-tokens of a run (consumed = LayerToken LR's total, App. C)."""
    consumed = baseline = 0
    for row in _iter_plan(config, steps, batch_size, seq_len):
        consumed, baseline = row.cumulative_layer_tokens, row.cumulative_baseline_layer_tokens
    return consumed, baseline


def total_saving(config: RandomLTDConfig, steps: int, batch_size: int, seq_len: int | None = None) -> float:
    """Planned fraction of layer-tokens saved over the run: ``1 - consumed / baseline`` (0 for 0 steps)."""
    consumed, baseline = planned_layer_tokens(config, steps, batch_size, seq_len)
    return 0.0 if baseline == 0 else 1.0 - consumed / baseline
