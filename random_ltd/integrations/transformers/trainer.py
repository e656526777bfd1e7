"""``RandomLTDTrainer``: ``transformers.Trainer`` with random-LTD driven by the DeepSpeed config it already uses.

    trainer = RandomLTDTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"), ...)
    trainer.train()          # the block data_efficiency.data_routing.random_ltd of ds_config.json is applied

Without DeepSpeed, pass the block (or a whole DeepSpeed-style config) as ``random_ltd_config=``. What it does:

* converts the model (``convert``) before the Trainer wraps it; state-dict keys are unchanged;
* advances the MSLG schedule once per optimizer step from exact layer-token counts (summed over data-parallel
  processes), the same accounting as ``random_ltd.initialize``;
* replaces the Trainer's LR scheduler with LayerToken LR when the config enables it (either form; an
  iteration-based ``scheduler`` block in the DeepSpeed config is then removed from what DeepSpeed sees). Optimizer
  step ``t`` uses the LR for the layer-tokens consumed before it, with and without DeepSpeed;
* adds ``random_ltd/*`` metrics (``random_ltd.monitor.METRIC_KEYS``) to the Trainer's training logs, so every
  ``report_to`` integration (W&B, TensorBoard, ...) receives them;
* saves its state as ``random_ltd_state.json`` in every Trainer checkpoint and restores it on
  ``train(resume_from_checkpoint=...)``;
* runs W&B offline when ``report_to`` includes wandb and no W&B credentials exist (``WANDB_MODE`` set wins).

For another ``Trainer`` subclass (TRL's ``SFTTrainer``, ...), ``callback.RandomLTDCallback`` does the same.

DeepSpeed's own random-LTD is switched off in the config DeepSpeed sees, so the two never both run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from random_ltd.config import RandomLTDConfig, layer_token_lr_config_from_deepspeed, load_deepspeed_config
from random_ltd.integrations.deepspeed.engine import _no_drop_config, deepspeed_view_of_config
from random_ltd.integrations.transformers.convert import convert, load_random_ltd_config
from random_ltd.layers.convert import find_layers
from random_ltd.monitor import RandomLTDMonitor, wandb_credentials_configured
from random_ltd.schedules import LayerTokenLR, MSLGSchedule

__all__ = ["RandomLTDTrainer", "STATE_FILE"]

logger = logging.getLogger("random_ltd")

#: file written into every Trainer checkpoint folder
STATE_FILE = "random_ltd_state.json"


class _Run:
    """What the trainer, its callback and (under DeepSpeed) the scheduler factory on a trainer copy share."""

    def __init__(self, state, schedule: MSLGSchedule, lr_config, enabled: bool) -> None:
        self.state = state
        self.schedule = schedule
        self.lr_config = lr_config
        self.lr_scheduler: LayerTokenLR | None = None
        self.monitor = RandomLTDMonitor(enabled=enabled, start_time=time.perf_counter())
        self.resume_dir: str | None = None
        self.optimizer = None

    # the engine-like view RandomLTDMonitor.metrics reads
    @property
    def random_ltd_schedule(self) -> MSLGSchedule:
        return self.schedule

    @property
    def random_ltd_state(self):
        return self.state

    def make_lr_scheduler(self, optimizer) -> LayerTokenLR:
        """LayerToken LR on ``optimizer``, fed this run's consumed layer-tokens (the trainer and the callback)."""
        self.optimizer = optimizer
        self.lr_scheduler = LayerTokenLR.from_config(
            optimizer, self.lr_config, layer_token_source=lambda: self.schedule.consumed_layer_tokens)
        return self.lr_scheduler

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups] if self.optimizer is not None else []

    def advance(self) -> None:
        sched = self.schedule
        self.state.advance(sched.step, sched.layer_kept_lengths(sched.step, sched.consumed_tokens))

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "state": self.state.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        self.schedule.load_state_dict(saved["schedule"])
        self.state.load_state_dict(saved["state"])
        self.advance()


class _RandomLTDCallback(TrainerCallback):
    """Per-step accounting, schedule and LR; restores the state at the start of a resumed run."""

    def __init__(self, run: _Run, device: torch.device) -> None:
        self.run = run
        self.device = device

    def on_train_begin(self, args, state, control, **kwargs):
        run = self.run
        if "deepspeed" in sys.modules:  # the Trainer ran deepspeed.initialize: drop its leaked CPU shm buffer name
            from random_ltd.integrations.deepspeed.launcher_guard import release_shm_buffers

            release_shm_buffers()
        if kwargs.get("optimizer") is not None:
            run.optimizer = kwargs["optimizer"]
        if run.resume_dir is not None:
            path = os.path.join(run.resume_dir, STATE_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    run.load_state_dict(json.load(f))
            else:
                logger.warning("random-LTD: checkpoint %s holds no %s; the schedule restarts at step 0",
                               run.resume_dir, STATE_FILE)
        run.advance()  # the LR needs nothing here: LayerTokenLR starts at 0 tokens, or the Trainer restored it

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # All micro-batches of the step have run forward and backward (recompute included): close the step.
        count = self.run.state.finish_step()
        totals = [count.consumed, count.baseline, count.samples, count.tokens]
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            t = torch.tensor(totals, dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            totals = [int(v) for v in t.tolist()]
        self.run.schedule.record(*totals)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # After the optimizer step (DeepSpeed's included): the next step's LR uses the layer-tokens consumed so far.
        if self.run.lr_scheduler is not None:
            self.run.lr_scheduler.step()

    def on_step_end(self, args, state, control, **kwargs):
        self.run.monitor.last = self.run.monitor.metrics(self.run)
        self.run.advance()


def _deepspeed_dict(args: Any) -> dict | None:
    """The DeepSpeed config the Trainer will hand to DeepSpeed (parsed by TrainingArguments), or None."""
    hf_ds = getattr(args, "hf_deepspeed_config", None)
    if hf_ds is not None:
        return hf_ds.config
    ds = getattr(args, "deepspeed", None)
    if isinstance(ds, dict):
        return ds
    if isinstance(ds, (str, os.PathLike)):
        return load_deepspeed_config(ds)
    return None


def _offline_wandb_without_credentials(training_args: Any) -> None:
    """``report_to`` wandb without W&B credentials: run W&B offline (no network, no login prompt, no UsageError),
    as ``random_ltd.initialize`` does for the DeepSpeed config's wandb block. ``WANDB_MODE`` set by the user wins."""
    report_to = getattr(training_args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    if ("wandb" in report_to or "all" in report_to) and "WANDB_MODE" not in os.environ \
            and not wandb_credentials_configured():
        os.environ["WANDB_MODE"] = "offline"
        logger.info("random-LTD: no W&B credentials; W&B runs offline (set WANDB_MODE to change that)")


def _setup(model: Any, training_args: Any, random_ltd_config: Any, random_ltd_layers: Any,
           passed_scheduler: Any = None) -> _Run:
    """Read the config, fix what DeepSpeed will see, convert ``model`` in place: what the trainer and callback share.

    Raises:
        ValueError: both ``random_ltd_config`` and a DeepSpeed config with a random-LTD block, or LayerToken LR
            together with an explicit scheduler (``passed_scheduler``).
    """
    ds = _deepspeed_dict(training_args)
    ds_block = ds is not None and "random_ltd" in ds.get("data_efficiency", {}).get("data_routing", {})
    if random_ltd_config is not None and ds_block:
        raise ValueError("random_ltd_config: the DeepSpeed config in args.deepspeed already has a random-LTD "
                         "block; give it in one place only")
    source = random_ltd_config if random_ltd_config is not None else ds
    if source is None:
        raise ValueError("no random-LTD config: set TrainingArguments(deepspeed=...) with the block "
                         "data_efficiency.data_routing.random_ltd, or pass random_ltd_config=")
    rltd = load_random_ltd_config(source)
    if isinstance(source, RandomLTDConfig) or (isinstance(source, dict) and "data_efficiency" not in source):
        lr_config = rltd.layer_token_lr_schedule.to_lr_config() \
            if rltd.enabled and rltd.layer_token_lr_schedule.enabled else None
    else:
        lr_config = layer_token_lr_config_from_deepspeed(source)
    if lr_config is not None and passed_scheduler is not None:
        raise ValueError("LayerToken LR is enabled in the random-LTD config; do not also pass a scheduler in "
                         "optimizers=")
    if ds is not None:  # what DeepSpeed sees: its own random-LTD off, our LayerToken LR instead of its scheduler
        view = deepspeed_view_of_config(ds, lr_config is not None)
        ds.clear()
        ds.update(view)
    _offline_wandb_without_credentials(training_args)

    found = find_layers(model, random_ltd_layers)
    schedule_config = rltd if rltd.enabled else _no_drop_config(len(found))  # baseline: counts, no drop
    state = convert(model, rltd, layers=random_ltd_layers,
                    data_parallel_rank=getattr(training_args, "process_index", 0))
    state.enabled = rltd.enabled
    return _Run(state, MSLGSchedule(schedule_config), lr_config, rltd.enabled)


class RandomLTDTrainer(Trainer):
    """``transformers.Trainer`` plus random-LTD (see the module docstring).

    Args (besides ``Trainer``'s):
        random_ltd_config: the random-LTD block, a whole DeepSpeed-style config (dict or JSON path) or a
            ``RandomLTDConfig``; only when ``args.deepspeed`` does not already hold a random-LTD block.
        random_ltd_layers: the transformer layers (class or modules) when auto-detection does not fit.

    Raises:
        ValueError: both ``random_ltd_config`` and a DeepSpeed config with a random-LTD block, or LayerToken LR
            together with an explicit ``optimizers=(..., scheduler)``.
        random_ltd.ConfigError: an invalid block (the message names the key path).
    """

    def __init__(self, *args: Any, random_ltd_config: Any = None, random_ltd_layers: Any = None,
                 **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if model is None or training_args is None:
            raise ValueError("RandomLTDTrainer needs model= and args= (TrainingArguments)")
        self.random_ltd = _setup(model, training_args, random_ltd_config, random_ltd_layers,
                                 passed_scheduler=kwargs.get("optimizers", (None, None))[1])
        super().__init__(*args, **kwargs)
        self.add_callback(_RandomLTDCallback(self.random_ltd, self.args.device))

    # ---- LR scheduler --------------------------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        run = self.random_ltd
        if run.lr_config is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = run.make_lr_scheduler(optimizer if optimizer is not None else self.optimizer)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def create_optimizer(self, *args: Any, **kwargs: Any):
        opt = super().create_optimizer(*args, **kwargs)
        self.random_ltd.optimizer = opt
        return opt

    # ---- logging ---------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.random_ltd.monitor.last:
            logs = {**logs, **self.random_ltd.monitor.last}
        super().log(logs, *args, **kwargs)

    def random_ltd_summary(self) -> str:
        """One line: steps, kept length, layer-tokens consumed vs baseline, saving, throughput."""
        return self.random_ltd.monitor.summary(self.random_ltd)

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(self.random_ltd.state_dict(), f)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        resume = resume_from_checkpoint
        if resume is True or (isinstance(resume, str) and resume == "True"):
            from transformers.trainer_utils import get_last_checkpoint

            resume = get_last_checkpoint(self.args.output_dir)
        self.random_ltd.resume_dir = resume if isinstance(resume, (str, os.PathLike)) and resume else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

