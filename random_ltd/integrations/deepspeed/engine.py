"""``random_ltd.initialize``: ``deepspeed.initialize`` plus random-LTD, driven by the DeepSpeed config's own block.

What it adds to the engine DeepSpeed returns (the engine stays a ``DeepSpeedEngine``; its class gains a mixin):
- the model's middle layers wrapped (``convert_to_random_ltd``), indices keyed by (seed, step, micro-batch, layer);
- the MSLG schedule advanced once per optimizer step, from exact layer-token counts summed over data-parallel ranks;
- LayerToken LR as the engine's ``lr_scheduler`` when the config asks for it (no lag: step t's LR uses the
  layer-tokens consumed before step t);
- all random-LTD state in DeepSpeed checkpoints (client state ``"random_ltd_state"``: DeepSpeed reserves
  ``"random_ltd"`` for its own scheduler and drops that key from the client state it loads), saved crash-safe
  (never rewriting a tag, ``latest`` written last; see ``checkpoint.py``) and loaded with clear errors;
- metrics through the engine's monitor (W&B, TensorBoard, CSV blocks of the DeepSpeed config).

DeepSpeed's own random-LTD is switched off in the config DeepSpeed sees, so the two never both run.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

import torch

from random_ltd.config import (
    RANDOM_LTD_PATH,
    ConfigError,
    ConfigIssue,
    RandomLTDConfig,
    layer_token_lr_config_from_deepspeed,
    load_deepspeed_config,
)
from random_ltd.integrations.deepspeed.checkpoint import atomic_save, rebuild_schedule_state, resolve_load_tag
from random_ltd.integrations.deepspeed.compat import RandomLTDSchedulerView, replaced_lr_scheduler_message
from random_ltd.layers import RandomLTDState, convert_to_random_ltd
from random_ltd.layers.convert import LayerSpec, find_layers
from random_ltd.monitor import RandomLTDMonitor, wandb_credentials_configured
from random_ltd.schedules import LayerTokenLR, MSLGSchedule

__all__ = ["initialize", "RandomLTDEngineMixin", "deepspeed_view_of_config"]

logger = logging.getLogger("random_ltd")

#: client-state key of our checkpoint state (not "random_ltd": DeepSpeed's load_checkpoint filters that one out)
CLIENT_STATE_KEY = "random_ltd_state"

#: kept length that means "never drop" (the wrapped layers cap it at the real sequence length)
_FULL = 2**31 - 1


def _load(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        return load_deepspeed_config(config)  # as DeepSpeed reads it: Hjson, duplicate keys rejected
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    return config


def deepspeed_view_of_config(ds_config: dict, layer_token_lr: bool = False) -> dict:
    """The config handed to DeepSpeed: our random-LTD block and LayerTokenLR scheduler removed (we run them).

    With ``layer_token_lr`` (LayerToken LR enabled in the random-LTD block), the iteration-based ``scheduler`` block
    is dropped too: LayerToken LR replaces it, as DeepSpeed's own (unimplemented) option intends.
    """
    ds = copy.deepcopy(ds_config)
    routing = ds.get("data_efficiency", {}).get("data_routing", {})
    if "random_ltd" in routing:
        routing["random_ltd"] = {"enabled": False}
    scheduler = ds.get("scheduler")
    if isinstance(scheduler, dict) and (scheduler.get("type") == "LayerTokenLR" or layer_token_lr):
        if scheduler.get("type") != "LayerTokenLR":
            logger.info("random-LTD: LayerToken LR replaces the configured %s scheduler", scheduler.get("type"))
        del ds["scheduler"]
    return ds


def _no_drop_config(num_layers: int) -> RandomLTDConfig:
    """Config for a baseline run: the same wrapped layers and accounting, but nothing is dropped."""
    return RandomLTDConfig.model_validate({
        "enabled": True, "total_layer_num": num_layers,
        "random_ltd_schedule": {"min_value": _FULL, "max_value": _FULL, "schedule_type": "constant"},
    })


class RandomLTDEngineMixin:
    """Mixed into the class of the engine ``deepspeed.initialize`` returned (see ``initialize``)."""

    random_ltd_state: RandomLTDState
    random_ltd_schedule: MSLGSchedule
    random_ltd_monitor: RandomLTDMonitor

    def step(self, lr_kwargs: dict | None = None) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        if boundary:
            self._random_ltd_record_step()
        super().step(lr_kwargs)
        if boundary:
            self.random_ltd_monitor.on_step(self)  # before advancing: report the kept lengths this step used
            self._random_ltd_advance()

    def _random_ltd_record_step(self) -> None:
        count = self.random_ltd_state.finish_step()
        totals = torch.tensor([count.consumed, count.baseline, count.samples, count.tokens], dtype=torch.float64,
                              device=self.device)
        if torch.distributed.is_initialized() and self.dp_world_size > 1:
            import deepspeed.comm as dist

            dist.all_reduce(totals, group=self.data_parallel_group)
        consumed, baseline, samples, tokens = (int(v) for v in totals.tolist())
        self.random_ltd_schedule.record(consumed, baseline, samples, tokens)

    def _random_ltd_advance(self) -> None:
        sched = self.random_ltd_schedule
        self.random_ltd_state.advance(sched.step, sched.layer_kept_lengths(sched.step, sched.consumed_tokens))

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True,
                        exclude_frozen_parameters=False):
        """DeepSpeed's ``save_checkpoint`` plus the random-LTD state, crash-safe (see ``checkpoint.atomic_save``).

        Unlike DeepSpeed: an existing ``<save_dir>/<tag>`` is never rewritten (FileExistsError), and ``latest`` is
        replaced atomically only after every rank has written its shards.
        """
        client_state = dict(client_state or {})
        client_state[CLIENT_STATE_KEY] = {"schedule": self.random_ltd_schedule.state_dict(),
                                            "state": self.random_ltd_state.state_dict()}
        return atomic_save(self, super().save_checkpoint, save_dir, tag, client_state, save_latest,
                           exclude_frozen_parameters)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        """DeepSpeed's ``load_checkpoint`` plus the random-LTD state; same arguments and return value.

        Differences from DeepSpeed, so that nothing resumes silently wrong:

        - an explicit ``tag``, or the tag ``latest`` names, that does not exist raises ``CheckpointNotFoundError``
          (a FileNotFoundError naming the path) instead of a bare AssertionError. No ``latest`` file at all (or no
          ``load_dir``) still returns ``(None, None)`` like DeepSpeed, with a warning: callers that require a
          checkpoint must check ``load_path``;
        - a checkpoint without random-LTD state (written by plain DeepSpeed) does not restart the schedule at step
          0 while the weights continue: the schedule counters are rebuilt from the engine's global step and batch
          size (a warning says so);
        - LayerToken LR loads from a checkpoint whose LR state is not LayerToken LR's (a ``--baseline`` run's
          iteration scheduler, or none): its LR is a function of the consumed layer-tokens, so it is rebuilt from
          them (a warning says so).
        """
        if not self.load_universal_checkpoint():
            tag = resolve_load_tag(load_dir, tag)
            if tag is None:
                logger.warning("random-LTD: no checkpoint loaded: %s has no 'latest' file", load_dir)
                return None, None
        own_lr = (isinstance(self.lr_scheduler, LayerTokenLR) and load_lr_scheduler_states
                  and not load_module_only)
        path, client_state = super().load_checkpoint(
            load_dir, tag=tag, load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states and not own_lr, load_module_only=load_module_only,
            custom_load_fn=custom_load_fn)
        if path is None:
            return path, client_state
        client_state = client_state or {}
        lr_state = client_state.pop("lr_scheduler", None) if own_lr else None
        saved = client_state.pop(CLIENT_STATE_KEY, None)
        if load_module_only:
            logger.info("random-LTD: load_module_only: weights from %s, the random-LTD schedule starts at step 0",
                        path)
            return path, client_state
        if saved is not None:
            self.random_ltd_schedule.load_state_dict(saved["schedule"])
            self.random_ltd_state.load_state_dict(saved["state"])
        else:
            rebuild_schedule_state(self.random_ltd_schedule, self.global_steps, self.train_batch_size())
            logger.warning("random-LTD: checkpoint %s holds no random-LTD state; the schedule was rebuilt from the "
                           "engine's global step %d and batch size %d (kept length %d, %d layer-tokens consumed)",
                           path, self.global_steps, self.train_batch_size(),
                           self.random_ltd_schedule.current_kept_length,
                           self.random_ltd_schedule.consumed_layer_tokens)
        self._random_ltd_advance()
        if own_lr:
            self._random_ltd_load_lr(lr_state, path)
        return path, client_state

    def _random_ltd_load_lr(self, lr_state: Any, path: str) -> None:
        lr = self.lr_scheduler
        if isinstance(lr_state, dict) and "consumed_layer_tokens" in lr_state:
            lr.load_state_dict(lr_state)
            return
        steps = self.global_steps - self.skipped_steps
        lr.load_state_dict({"consumed_layer_tokens": self.random_ltd_schedule.consumed_layer_tokens,
                            "last_epoch": steps, "_step_count": steps + 1})
        kind = "no LR scheduler state" if lr_state is None else "another LR scheduler's state"
        logger.warning("random-LTD: checkpoint %s holds %s; LayerToken LR was rebuilt from the %d layer-tokens "
                       "consumed (lr %s)", path, kind, self.random_ltd_schedule.consumed_layer_tokens,
                       lr.get_last_lr())

    def random_ltd_enabled(self) -> bool:
        """True while random-LTD drops tokens: DeepSpeed's own accessor (Megatron-DeepSpeed asserts on it).

        DeepSpeed's engine then also calls ``self.random_ltd_scheduler`` (our view, see ``compat``) in its forward
        prologue and checkpoints; the view keeps those calls consistent with our schedule.
        """
        return bool(self.random_ltd_state.enabled)

    def random_ltd_summary(self) -> str:
        """One line: steps, kept length, layer-tokens consumed vs baseline, saving, throughput."""
        return self.random_ltd_monitor.summary(self)


_ENGINE_CLASSES: dict[type, type] = {}


def _engine_class(cls: type) -> type:
    if issubclass(cls, RandomLTDEngineMixin):
        return cls
    if cls not in _ENGINE_CLASSES:
        _ENGINE_CLASSES[cls] = type(f"RandomLTD{cls.__name__}", (RandomLTDEngineMixin, cls), {})
    return _ENGINE_CLASSES[cls]


def _data_parallel_rank(engine: Any, mpu: Any) -> int:
    if mpu is not None and hasattr(mpu, "get_data_parallel_rank"):
        return int(mpu.get_data_parallel_rank())
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(group=engine.data_parallel_group)
    return 0


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int | None = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: str | dict | None = None,
    mesh_param: Any = None,
    config_params: str | dict | None = None,
    *,
    layers: LayerSpec = None,
):
    """Drop-in for ``deepspeed.initialize`` that applies the config's random-LTD block.

    Same arguments and return value ``(engine, optimizer, dataloader, lr_scheduler)``; ``layers`` optionally names
    the transformer layers (a class, or the modules; default: the longest run of one block class in any container).
    With random-LTD disabled the layers are still counted (nothing is dropped), so a baseline run reports the same
    layer-token metrics. With LayerToken LR enabled in the config, a passed ``lr_scheduler`` is replaced by it (a
    logged warning: the config wins).

    Raises:
        random_ltd.ConfigError: an invalid random-LTD or LayerTokenLR block (the message names the key path).
    """
    import deepspeed

    if model is None:
        raise ValueError("model is required")
    ds_config = _load(config if config is not None else config_params)
    if not ds_config and args is not None and getattr(args, "deepspeed_config", None):
        ds_config = _load(args.deepspeed_config)
        args = copy.copy(args)
        args.deepspeed_config = None
    rltd = RandomLTDConfig.from_deepspeed(ds_config)
    lr_config = layer_token_lr_config_from_deepspeed(ds_config)

    found = find_layers(model, layers)
    if rltd.enabled and rltd.total_layer_num != len(found):  # checked before DeepSpeed builds anything
        raise ConfigError([ConfigIssue(f"{RANDOM_LTD_PATH}.total_layer_num",
                                       f"{rltd.total_layer_num} != {len(found)} layers found in "
                                       f"{type(model).__name__} (must equal the model's layer count)")])
    schedule = MSLGSchedule(rltd if rltd.enabled else _no_drop_config(len(found)))
    if lr_config is not None:
        if lr_scheduler is not None:
            logger.warning(replaced_lr_scheduler_message(lr_scheduler))

        def lr_scheduler(opt):
            return LayerTokenLR.from_config(opt, lr_config,
                                            layer_token_source=lambda: schedule.consumed_layer_tokens)

    if ds_config.get("wandb", {}).get("enabled") and "WANDB_MODE" not in os.environ \
            and not wandb_credentials_configured():
        os.environ["WANDB_MODE"] = "offline"  # no network (and no login prompt) unless the user configured W&B

    kwargs = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                  training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                  dist_init_required=dist_init_required, collate_fn=collate_fn,
                  config=deepspeed_view_of_config(ds_config, lr_config is not None), mesh_param=mesh_param)
    if distributed_port is not None:
        kwargs["distributed_port"] = distributed_port
    engine, opt, loader, sched = deepspeed.initialize(**kwargs)
    from random_ltd.integrations.deepspeed.launcher_guard import release_shm_buffers

    release_shm_buffers()  # DeepSpeed's CPU allreduce buffers would otherwise stay in /dev/shm after the run

    attach(engine, found, schedule, enabled=rltd.enabled, mpu=mpu)
    return engine, opt, loader, sched


def _is_transformers_model(module: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(module, PreTrainedModel)


def attach(engine: Any, found: list[torch.nn.Module], schedule: MSLGSchedule, *, enabled: bool,
           mpu: Any = None) -> Any:
    """Give a built DeepSpeed engine random-LTD: wrap ``found``, install the mixin, state, schedule, monitor and
    DeepSpeed's ``random_ltd_scheduler`` accessor (a view over the schedule). Returns the engine."""
    rank = _data_parallel_rank(engine, mpu)
    if _is_transformers_model(engine.module):  # HF layers: masks, caches and rotary handled by the HF adapter
        from random_ltd.integrations.transformers.convert import convert

        state = convert(engine.module, schedule.config, layers=found, data_parallel_rank=rank)
    else:
        state = convert_to_random_ltd(engine, found, schedule.config, data_parallel_rank=rank)
    state.enabled = enabled
    engine.__class__ = _engine_class(type(engine))
    engine.random_ltd_state = state
    engine.random_ltd_schedule = schedule
    engine.random_ltd_monitor = RandomLTDMonitor(enabled=enabled, start_time=time.perf_counter())
    engine.random_ltd_scheduler = RandomLTDSchedulerView(engine)
    engine._random_ltd_advance()
    return engine
