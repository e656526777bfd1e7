"""DeepSpeed's own random-LTD API, over our schedule: what DeepSpeed clients call keeps working.

DeepSpeed 0.19.8 clients (DeepSpeedExamples' ``run_clm_no_trainer.py`` and ``main_cifar.py``, Megatron-DeepSpeed)
write::

    from deepspeed.runtime.data_pipeline.data_routing.helper import convert_to_random_ltd, save_without_random_ltd
    model, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=optimizer, args=args, ...)
    model = convert_to_random_ltd(model, GPT2Block)
    model.random_ltd_scheduler.get_current_seq()

With the import changed to ``random_ltd.integrations.deepspeed.helper`` (or this module) the rest runs as is:

- :func:`convert_to_random_ltd` (engine, layer class) gives the DeepSpeed engine everything ``random_ltd.initialize``
  gives (dropping, MSLG advanced per optimizer step, metrics, checkpoint state, LayerToken LR when configured) and
  returns the engine, as DeepSpeed's does.
- ``engine.random_ltd_scheduler`` is a :class:`RandomLTDSchedulerView`: DeepSpeed's ``RandomLTDScheduler`` methods
  with DeepSpeed's meanings, computed from our schedule (no second copy of the state); the differences are listed
  on each method.
- :func:`save_without_random_ltd` and :func:`remove_random_ltd_state_dict` exist for the same import line; our
  wrapping never renames a parameter, so they return the plain state dict.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from random_ltd.schedules import planned_layer_tokens

__all__ = [
    "RandomLTDSchedulerView",
    "convert_to_random_ltd",
    "remove_random_ltd_state_dict",
    "replaced_lr_scheduler_message",
    "save_without_random_ltd",
]

logger = logging.getLogger("random_ltd")

#: key of our full state inside the view's ``state_dict`` (DeepSpeed stores that dict as checkpoint["random_ltd"])
FULL_STATE_KEY = "random_ltd_state"

#: DeepSpeed's ``RandomLTDScheduler.state_dict`` keys (deepspeed/runtime/data_pipeline/constants.py)
_DS_STATE_KEYS = ("consumed_layer_tokens", "current_steps", "current_value", "min_value", "max_value")


def replaced_lr_scheduler_message(passed: Any) -> str:
    """The warning logged when the config's LayerToken LR replaces a client-passed ``lr_scheduler``."""
    name = getattr(passed, "__name__", None) or type(passed).__name__
    return (f"random-LTD: LayerToken LR is enabled in the DeepSpeed config, so it replaces the lr_scheduler passed "
            f"by the client ({name}); the config wins, as DeepSpeed's config-over-arguments rule. To keep your "
            f"scheduler, disable data_efficiency.data_routing.random_ltd.layer_token_lr_schedule (or remove the "
            f"'LayerTokenLR' scheduler block).")


# --------------------------------------------------------------------------------------------------------------------
# engine.random_ltd_scheduler
# --------------------------------------------------------------------------------------------------------------------


class _StateView(Mapping):
    """``random_ltd_scheduler.state``: DeepSpeed's keys, read live from our schedule."""

    _KEYS = ("consumed_layer_tokens", "current_value", "current_steps", "min_value", "max_value", "schedule_type",
             "schedule_config")

    def __init__(self, view: RandomLTDSchedulerView) -> None:
        self._view = view

    def __getitem__(self, key: str) -> Any:
        v = self._view
        sched = v._schedule
        if key == "consumed_layer_tokens":
            return sched.consumed_layer_tokens
        if key == "current_value":
            return v.get_current_seq()
        if key == "current_steps":
            return sched.step
        if key == "min_value":
            return sched.min_value
        if key == "max_value":
            return sched.max_value
        if key == "schedule_type":
            return sched.schedule_type
        if key == "schedule_config":
            cfg = {"require_steps": sched.require_steps, "seq_per_step": sched.seq_per_step}
            if sched.require_tokens is not None:
                cfg["require_tokens"] = sched.require_tokens
            return cfg
        if key in ("sample_idx", "attention_mask"):
            raise KeyError(f"random_ltd_scheduler.state[{key!r}]: random_ltd never stores indices or masks (each "
                           "wrapped layer redraws them from (seed, step, micro-batch, layer)); use "
                           "engine.random_ltd_state.indices(layer_id, batch, seq_len, keep, device)")
        raise KeyError(f"random_ltd_scheduler.state has no key {key!r}; keys: {', '.join(self._KEYS)}")

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "current_value":
            self._view.set_current_seq(value)
            return
        raise TypeError(f"random_ltd_scheduler.state[{key!r}] is read-only (it is computed from the schedule); only "
                        "'current_value' can be set (as set_current_seq)")

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


class RandomLTDSchedulerView:
    """DeepSpeed's ``RandomLTDScheduler`` interface as a view over the engine's ``MSLGSchedule``/``RandomLTDState``.

    Same names and meanings as DeepSpeed 0.19.8, except where DeepSpeed's are wrong or stateful by accident:
    ``consumed_layer_tokens`` is what really ran (summed over data-parallel ranks), not
    ``global_batch * (kept * n + max * (L - n))`` with the batch size captured at start; ``get_total_layer_tokens``
    does not change the schedule; ``set_current_seq`` holds for the rest of the optimizer step.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._override: tuple[int, int] | None = None  # (optimizer step, kept length) from set_current_seq

    @property
    def _schedule(self):
        return self._engine.random_ltd_schedule

    @property
    def _state(self):
        return self._engine.random_ltd_state

    # -- attributes DeepSpeed's scheduler has ------------------------------------------------------------------
    @property
    def model_layer_num(self) -> int:
        """L, the model's transformer layers (``total_layer_num``)."""
        return self._schedule.num_layers

    @property
    def random_ltd_layer_num(self) -> int:
        """n, the layers that drop tokens (``random_ltd_layer_num``)."""
        return len(self._schedule.layer_ids)

    @property
    def global_batch_size(self) -> int:
        """The engine's ``train_batch_size()`` (DeepSpeed captures it at start; we count actual tokens instead)."""
        return int(self._engine.train_batch_size())

    @property
    def state(self) -> _StateView:
        """DeepSpeed's ``state`` dict keys, live: ``consumed_layer_tokens``, ``current_value``, ``current_steps``,
        ``min_value``, ``max_value``, ``schedule_type``, ``schedule_config``."""
        return _StateView(self)

    def get_state(self) -> _StateView:
        return self.state

    # -- methods -----------------------------------------------------------------------------------------------
    def get_random_ltd_layer_num(self) -> int:
        """n, the number of layers that drop tokens."""
        return self.random_ltd_layer_num

    def get_current_seq(self) -> int:
        """Tokens the dropping layers keep at the current optimizer step (``max_value`` once fully grown)."""
        sched = self._schedule
        if self._override is not None and self._override[0] == sched.step:
            return self._override[1]
        return sched.current_kept_length

    def set_current_seq(self, seq_length: int) -> None:
        """Keep ``seq_length`` tokens in every dropping layer for the rest of this optimizer step.

        DeepSpeed's own value is overwritten by its next training forward (unless ``>= max_value``); ours lasts until
        the schedule advances at the next optimizer step. The layer-token counts follow what really ran.
        """
        if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
            raise ValueError(f"set_current_seq: seq_length must be a positive int, got {seq_length!r}")
        step = self._schedule.step
        self._override = (step, seq_length)
        self._state.advance(self._state.step, {lid: seq_length for lid in self._schedule.layer_ids})

    def update_seq(self, global_steps: int) -> None:
        """Set the kept length to the schedule's value at optimizer step ``global_steps``.

        DeepSpeed's engine calls this before every training forward with its ``global_steps``, which equals our
        schedule's step: then nothing changes (the schedule already advanced in ``engine.step()``). Another step
        sets that step's kept lengths until the next optimizer step. Layer-tokens are never added here: they are
        counted from what the layers ran.
        """
        sched = self._schedule
        if global_steps == sched.step:
            return
        lengths = sched.layer_kept_lengths(global_steps, sched.consumed_tokens)
        self._override = (sched.step, sched.kept_length(global_steps, sched.consumed_tokens))
        self._state.advance(self._state.step, lengths)

    def get_total_layer_tokens(self, train_iters: int) -> int:
        """Planned layer-tokens of ``train_iters`` optimizer steps at the engine's global batch and ``max_value``.

        DeepSpeed's formula, ``sum_t global_batch * (kept_t * n + max * (L - n))``; unlike DeepSpeed's this does not
        advance (or break) the running schedule.
        """
        return planned_layer_tokens(self._schedule.config, train_iters, self.global_batch_size)[0]

    def state_dict(self) -> dict[str, Any]:
        """DeepSpeed's five keys, plus our full state under ``"random_ltd_state"`` (what ``load_state_dict`` reads).

        DeepSpeed's ``save_checkpoint`` stores this as ``checkpoint["random_ltd"]``.
        """
        sd: dict[str, Any] = {k: self.state[k] for k in _DS_STATE_KEYS}
        sd[FULL_STATE_KEY] = {"schedule": self._schedule.state_dict(), "state": self._state.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any] | None) -> None:
        """Restore from :meth:`state_dict` (DeepSpeed's ``load_checkpoint`` calls it). ``None`` (a checkpoint of a
        run without random-LTD) changes nothing; a state saved by DeepSpeed's own random-LTD is refused."""
        if state_dict is None:
            return
        full = state_dict.get(FULL_STATE_KEY)
        if full is None:
            raise ValueError(
                "random_ltd_scheduler.load_state_dict: this state was saved by DeepSpeed's own random-LTD "
                f"(keys {sorted(state_dict)}); it lacks the baseline, sample and token counters random_ltd keeps, so "
                "it cannot be resumed exactly. Load the model weights and start the schedule from a fresh config.")
        self._schedule.load_state_dict(full["schedule"])
        self._state.load_state_dict(full["state"])
        self._override = None
        self._engine._random_ltd_advance()


# --------------------------------------------------------------------------------------------------------------------
# convert_to_random_ltd / save_without_random_ltd in DeepSpeed's call form
# --------------------------------------------------------------------------------------------------------------------


def _deepspeed_engine_class() -> type | None:
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:
        return None
    return DeepSpeedEngine


def _engine_config(engine: Any, config: Any) -> dict:
    """The whole DeepSpeed config: ``config`` (dict or JSON path) if given, else the one the engine was built from.

    The engine's raw ``_config._param_dict``, not its parsed ``random_ltd_config()`` (DeepSpeed injects
    ``global_batch_size``/``micro_batch_size`` into that copy).
    """
    from random_ltd.integrations.deepspeed.engine import _load

    if config is not None:
        return _load(config)
    raw = getattr(getattr(engine, "_config", None), "_param_dict", None)
    if not isinstance(raw, dict):
        raise TypeError("convert_to_random_ltd: cannot read the DeepSpeed config of this engine; pass config= "
                        "(the DeepSpeed config dict or JSON path)")
    return raw


def convert_to_random_ltd(model: Any, convert_type: Any = None, config: Any = None) -> Any:
    """DeepSpeed's ``convert_to_random_ltd(model, convert_type)``: set up random-LTD and return ``model``.

    Args:
        model: the engine ``deepspeed.initialize`` returned (DeepSpeed's call form), an engine from
            ``random_ltd.initialize`` (returned unchanged), or a plain ``nn.Module`` (its layers are wrapped with
            ``config``; pass it to ``random_ltd.initialize`` next).
        convert_type: the transformer layer class (``GPT2Block``, timm's ``Block``); default: auto-detected (the
            longest run of one block class in any container).
        config: the DeepSpeed config (dict or JSON path); default: the one the engine was built from.

    After this the engine drops tokens in training forwards, advances MSLG once per optimizer step, logs
    ``random_ltd/*`` through its monitor, saves and restores the schedule in its checkpoints, answers
    ``random_ltd_enabled()`` and ``random_ltd_scheduler``, and, when the config enables LayerToken LR, uses it as
    ``engine.lr_scheduler`` (replacing a client scheduler, with a warning).

    Raises:
        random_ltd.ConfigError: an invalid random-LTD block, or ``total_layer_num`` not the number of layers found.
    """
    from random_ltd.config import (
        RANDOM_LTD_PATH,
        ConfigError,
        ConfigIssue,
        RandomLTDConfig,
        layer_token_lr_config_from_deepspeed,
    )
    from random_ltd.integrations.deepspeed.engine import RandomLTDEngineMixin, _no_drop_config, attach
    from random_ltd.layers import convert_to_random_ltd as convert_layers
    from random_ltd.layers.convert import find_layers
    from random_ltd.schedules import LayerTokenLR, MSLGSchedule

    if isinstance(model, RandomLTDEngineMixin):
        return model
    engine_cls = _deepspeed_engine_class()
    if engine_cls is None or not isinstance(model, engine_cls):
        if not isinstance(model, nn.Module):
            raise TypeError(f"convert_to_random_ltd: model must be a DeepSpeed engine or an nn.Module, got "
                            f"{type(model).__name__}")
        if isinstance(config, (str, os.PathLike)):
            config = RandomLTDConfig.from_deepspeed(config)
        convert_layers(model, convert_type, config)
        return model

    engine = model
    ds_config = _engine_config(engine, config)
    rltd = RandomLTDConfig.from_deepspeed(ds_config)
    lr_config = layer_token_lr_config_from_deepspeed(ds_config)
    found = find_layers(engine.module, convert_type)
    if rltd.enabled and rltd.total_layer_num != len(found):
        raise ConfigError([ConfigIssue(f"{RANDOM_LTD_PATH}.total_layer_num",
                                       f"{rltd.total_layer_num} != {len(found)} layers found in "
                                       f"{type(engine.module).__name__} (must equal the model's layer count)")])
    schedule = MSLGSchedule(rltd if rltd.enabled else _no_drop_config(len(found)))
    attach(engine, found, schedule, enabled=rltd.enabled, mpu=getattr(engine, "mpu", None))
    if lr_config is not None:
        if engine.lr_scheduler is not None:
            logger.warning(replaced_lr_scheduler_message(engine.lr_scheduler))
        engine.lr_scheduler = LayerTokenLR.from_config(
            engine.basic_optimizer, lr_config, layer_token_source=lambda: schedule.consumed_layer_tokens)
    return engine


def remove_random_ltd_state_dict(state_dict: Mapping[str, Any]) -> OrderedDict:
    """DeepSpeed's helper: strip ``.random_ltd_layer`` from keys. Our wrapping never adds it, so only a state dict
    saved by DeepSpeed's own random-LTD changes; that makes it loadable into the plain model."""
    return OrderedDict((k.replace(".random_ltd_layer", ""), v) for k, v in state_dict.items())


def save_without_random_ltd(model: Any) -> OrderedDict:
    """DeepSpeed's helper: the model's state dict as the plain (unconverted) model has it.

    ``model`` may be an engine (its ``.module`` is used) or a module. Our keys already are the plain model's.
    """
    module = model.module if hasattr(model, "module") else model
    return remove_random_ltd_state_dict(module.state_dict())
