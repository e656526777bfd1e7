"""LayerToken LR (paper section 3.3, Appendix C): warmup and decay measured in consumed layer-tokens.

A layer-token is one token processed by one layer. An iteration-based schedule with ``T_warmup`` warmup steps and
``T`` total steps becomes, per Appendix C:

* warmup over ``warmup_layer_tokens = L * s * b * T_warmup`` (eq. 1: the layer-tokens the baseline consumes during
  its warmup; with random-LTD each step consumes fewer, so the warmup lasts more steps), and
* decay until ``total_layer_tokens`` = everything the random-LTD run consumes in ``T`` steps (eq. 2 gives the decay
  length as that minus the warmup).

With no dropping (``L * s * b`` layer-tokens per step) this is exactly the iteration-based schedule.

The LR as a function of the consumed count ``c`` (one formula, :func:`layer_token_lr`, used by the scheduler, the
CLI plan and the tests)::

    c < W:          lr * c / W                                    (linear warmup from 0)
    W <= c < T:     min_lr + (lr - min_lr) * g((c - W) / (T - W))  g = cosine: (1 + cos(pi x)) / 2, linear: 1 - x
    c >= T:         min_lr                                        ('constant' decay stays at lr throughout)

Warmup starts from 0, as Megatron-LM (the paper's code base) and DeepSpeed's defaults do (``WarmupDecayLR``:
``warmup_min_lr`` 0; ``WarmupCosineLR``: ``warmup_min_ratio`` 0). DeepSpeed's WarmupDecayLR warms up from its
``warmup_min_lr`` and decays back to it; here the decay floor ``min_lr`` does not move the warmup start.

Timing: the engine calls ``step(c_t)`` after optimizer step ``t`` with the layer-tokens consumed up to and including
step ``t``; the LR of step ``t + 1`` is then ``layer_token_lr(c_t)``, with no lag. (DeepSpeed's iteration schedulers
lag one step: the LR of step ``t + 1`` uses iteration ``t``; see tests/schedules/test_layer_token_lr.py.)
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.optim.lr_scheduler import LRScheduler

from random_ltd.config import LayerTokenLRConfig, LayerTokenLRSchedule, RandomLTDConfig

__all__ = [
    "LayerTokenBudget",
    "LayerTokenLR",
    "iteration_equivalent",
    "layer_token_lr",
    "planned_lrs",
    "random_ltd_budget",
]

_WARMUP_TYPES = ("linear",)
_DECAY_TYPES = ("linear", "cosine", "constant")
_HYPERPARAMETERS = ("total_layer_tokens", "warmup_layer_tokens", "warmup_type", "decay_type", "min_lrs", "peak_lrs")


def _check_schedule(
    total_layer_tokens: float, warmup_layer_tokens: float, warmup_type: str, decay_type: str, min_lr: float
) -> None:
    """Validate schedule hyperparameters (shared by the function and the scheduler)."""
    if warmup_type not in _WARMUP_TYPES:
        hint = ""
        if warmup_type == "log":
            hint = " (DeepSpeed's 'log' warmup needs a step unit that layer-tokens do not have)"
        raise ValueError(f"warmup_type must be one of {_WARMUP_TYPES}, got {warmup_type!r}{hint}")
    if decay_type not in _DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {_DECAY_TYPES}, got {decay_type!r}")
    if not (isinstance(total_layer_tokens, numbers.Real) and total_layer_tokens > 0):
        raise ValueError(f"total_layer_tokens must be > 0, got {total_layer_tokens!r}")
    if not (isinstance(warmup_layer_tokens, numbers.Real) and 0 <= warmup_layer_tokens <= total_layer_tokens):
        raise ValueError(
            f"warmup_layer_tokens must be in [0, total_layer_tokens={total_layer_tokens}], got {warmup_layer_tokens!r}"
        )
    if not (isinstance(min_lr, numbers.Real) and min_lr >= 0):
        raise ValueError(f"min_lr must be >= 0, got {min_lr!r}")


def _check_consumed(consumed: Any) -> float | int:
    """A consumed layer-token count: a finite real >= 0 (tensors/numpy scalars accepted)."""
    if isinstance(consumed, torch.Tensor):
        consumed = consumed.item()
    if isinstance(consumed, bool) or not isinstance(consumed, numbers.Real) or not math.isfinite(consumed):
        raise TypeError(f"consumed layer-tokens must be a finite number, got {consumed!r}")
    if consumed < 0:
        raise ValueError(f"consumed layer-tokens must be >= 0, got {consumed}")
    return consumed


def layer_token_lr(
    consumed_layer_tokens: float,
    *,
    lr: float,
    total_layer_tokens: float,
    warmup_layer_tokens: float = 0,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr: float = 0.0,
) -> float:
    """The LR after ``consumed_layer_tokens`` layer-tokens (Appendix C, see the module docstring)."""
    _check_schedule(total_layer_tokens, warmup_layer_tokens, warmup_type, decay_type, min_lr)
    c = _check_consumed(consumed_layer_tokens)
    if c < warmup_layer_tokens:
        return lr * c / warmup_layer_tokens
    if decay_type == "constant":
        return lr
    span = total_layer_tokens - warmup_layer_tokens
    progress = 1.0 if c >= total_layer_tokens or span <= 0 else (c - warmup_layer_tokens) / span
    if decay_type == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (lr - min_lr) * shape


def planned_lrs(
    rows: Sequence[Any], lr_config: LayerTokenLRConfig | LayerTokenLRSchedule, lr: float
) -> list[float]:
    """The LayerToken LR of every planned step: ``lrs[i]`` is the LR optimizer step ``rows[i].step`` runs at.

    ``rows`` is an MSLG plan (:func:`random_ltd.schedules.plan`); step ``i`` runs at ``layer_token_lr`` of the
    layer-tokens consumed before it (the engine's timing, module docstring), with peak ``lr``. This is what the
    engine does with a constant batch of full-length sequences; the CLI ``plan`` prints it, and a baseline can replay
    it (``--lr-schedule-of``) to separate the schedule from the dropping.
    """
    if lr_config.total_layer_tokens is None:
        raise ValueError("LayerToken LR config has no total_layer_tokens (is it enabled?)")
    c = lr_config
    return [layer_token_lr(r.cumulative_layer_tokens - r.layer_tokens, lr=lr, total_layer_tokens=c.total_layer_tokens,
                           warmup_layer_tokens=c.warmup_layer_tokens, warmup_type=c.warmup_type,
                           decay_type=c.decay_type, min_lr=c.min_lr) for r in rows]


def _per_group(value: float | Sequence[float], groups: int, name: str) -> list[float]:
    """Broadcast a scalar to every param group, or check a per-group sequence."""
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ValueError(f"{name} has {len(value)} values but the optimizer has {groups} param groups")
        return [float(v) for v in value]
    return [float(value)] * groups  # type: ignore[arg-type]


class LayerTokenLR(LRScheduler):
    """LR scheduler driven by consumed layer-tokens instead of iterations (paper Appendix C).

    Call ``step(consumed_layer_tokens)`` after every optimizer step with the total layer-tokens consumed so far
    (including that step), or construct with ``layer_token_source`` (e.g. ``lambda: mslg.consumed_layer_tokens``)
    and call ``step()``. At construction the LR is set for ``c = 0`` (or the source's current value).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_layer_tokens: float,
        warmup_layer_tokens: float = 0,
        warmup_type: str = "linear",
        decay_type: str = "cosine",
        min_lr: float | Sequence[float] = 0.0,
        lr: float | Sequence[float] | None = None,
        layer_token_source: Callable[[], int | float] | None = None,
        last_epoch: int = -1,
    ) -> None:
        groups = len(optimizer.param_groups)
        initial = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.peak_lrs = _per_group([float(v) for v in initial] if lr is None else lr, groups, "lr")
        self.min_lrs = _per_group(min_lr, groups, "min_lr")
        for m in self.min_lrs:
            _check_schedule(total_layer_tokens, warmup_layer_tokens, warmup_type, decay_type, m)
        for i, (peak, m) in enumerate(zip(self.peak_lrs, self.min_lrs)):
            if m > peak and decay_type != "constant":
                raise ValueError(f"param group {i}: min_lr {m} > peak lr {peak} (the decay must go down)")
        self.total_layer_tokens = total_layer_tokens
        self.warmup_layer_tokens = warmup_layer_tokens
        self.warmup_type = warmup_type
        self.decay_type = decay_type
        self.consumed_layer_tokens: float | int = 0
        self._layer_token_source = layer_token_source
        super().__init__(optimizer, last_epoch)

    @classmethod
    def from_config(
        cls,
        optimizer: torch.optim.Optimizer,
        config: LayerTokenLRConfig | LayerTokenLRSchedule,
        *,
        layer_token_source: Callable[[], int | float] | None = None,
    ) -> LayerTokenLR:
        """Build from a validated config (either form); ``config.lr`` (if any) is the peak LR."""
        if config.total_layer_tokens is None:
            raise ValueError("LayerToken LR config has no total_layer_tokens (is it enabled?)")
        return cls(
            optimizer,
            total_layer_tokens=config.total_layer_tokens,
            warmup_layer_tokens=config.warmup_layer_tokens,
            warmup_type=config.warmup_type,
            decay_type=config.decay_type,
            min_lr=config.min_lr,
            lr=getattr(config, "lr", None),
            layer_token_source=layer_token_source,
        )

    def lr_at(self, consumed_layer_tokens: float) -> list[float]:
        """LR of each param group after ``consumed_layer_tokens`` layer-tokens (pure; does not step)."""
        return [
            layer_token_lr(
                consumed_layer_tokens,
                lr=peak,
                total_layer_tokens=self.total_layer_tokens,
                warmup_layer_tokens=self.warmup_layer_tokens,
                warmup_type=self.warmup_type,
                decay_type=self.decay_type,
                min_lr=m,
            )
            for peak, m in zip(self.peak_lrs, self.min_lrs)
        ]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """LR of each param group for the current consumed count."""
        return self.lr_at(self.consumed_layer_tokens)

    def step(self, consumed_layer_tokens: float | None = None) -> None:  # type: ignore[override]
        """Set the LR for the layer-tokens consumed so far (given, else read from ``layer_token_source``)."""
        if consumed_layer_tokens is None:
            if self._layer_token_source is not None:
                consumed_layer_tokens = self._layer_token_source()
            elif self._is_initial:
                consumed_layer_tokens = self.consumed_layer_tokens
            else:
                raise RuntimeError(
                    "LayerTokenLR.step() needs the consumed layer-token count: call step(consumed_layer_tokens) or "
                    "construct the scheduler with layer_token_source="
                )
        self.consumed_layer_tokens = _check_consumed(consumed_layer_tokens)
        super().step()

    def state_dict(self) -> dict[str, Any]:
        """Consumed count, step counters and hyperparameters (the source callable is not saved)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_layer_token_source")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the consumed count and step counters, then re-apply the LR.

        Hyperparameters are not restored: the current ones win, and a difference is warned about (the same rule as
        MSLGSchedule.load_state_dict).
        """
        if "consumed_layer_tokens" not in state_dict:
            raise KeyError("LayerTokenLR state_dict has no 'consumed_layer_tokens'")
        changed = [k for k in _HYPERPARAMETERS if k in state_dict and state_dict[k] != getattr(self, k)]
        if changed:
            details = "; ".join(f"{k}: {state_dict[k]!r} -> {getattr(self, k)!r}" for k in changed)
            warnings.warn(
                f"LayerTokenLR checkpoint has different hyperparameters; the current ones win. Changed: {details}",
                UserWarning,
                stacklevel=2,
            )
        self.consumed_layer_tokens = _check_consumed(state_dict["consumed_layer_tokens"])
        for key in ("last_epoch", "_step_count"):
            if key in state_dict:
                setattr(self, key, state_dict[key])
        for group, value in zip(self.optimizer.param_groups, self.get_lr()):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(value)
            else:
                group["lr"] = value
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                         for g in self.optimizer.param_groups]


class LayerTokenBudget(NamedTuple):
    """Warmup and total of a LayerToken LR schedule, in layer-tokens."""

    warmup_layer_tokens: int
    total_layer_tokens: int


def iteration_equivalent(
    *, warmup_steps: int, total_steps: int, batch_size: int, seq_len: int, num_layers: int
) -> LayerTokenBudget:
    """Layer-token budget equal to an iteration-based schedule without dropping: ``L * seq_len * batch * steps``."""
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps), ("batch_size", batch_size),
                        ("seq_len", seq_len), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps {warmup_steps} > total_steps {total_steps}")
    per_step = int(num_layers) * int(seq_len) * int(batch_size)
    return LayerTokenBudget(per_step * int(warmup_steps), per_step * int(total_steps))


def random_ltd_budget(
    config: RandomLTDConfig, *, warmup_steps: int, total_steps: int, batch_size: int, seq_len: int | None = None
) -> LayerTokenBudget:
    """Appendix C budget for a random-LTD run replacing an iteration schedule (``warmup_steps``, ``total_steps``).

    Warmup: the baseline's warmup layer-tokens ``L * s * b * T_warmup`` (eq. 1). Total: the layer-tokens the
    random-LTD run consumes in ``total_steps`` steps per its MSLG plan (eq. 2 plus the warmup).
    """
    from random_ltd.schedules.mslg import planned_layer_tokens

    seq = config.random_ltd_schedule.max_value if seq_len is None else seq_len
    if config.total_layer_num is None or seq is None:
        raise ValueError("config needs total_layer_num and random_ltd_schedule.max_value (or seq_len)")
    baseline = iteration_equivalent(warmup_steps=warmup_steps, total_steps=total_steps, batch_size=batch_size,
                                    seq_len=seq, num_layers=config.total_layer_num)
    consumed, _ = planned_layer_tokens(config, total_steps, batch_size, seq)
    return LayerTokenBudget(baseline.warmup_layer_tokens, consumed)
