"""``RandomLTDCallback``: random-LTD for any ``transformers.Trainer`` subclass (TRL's ``SFTTrainer``, PEFT models).

    trainer = SFTTrainer(model=peft_model, args=SFTConfig(...), train_dataset=ds,
                         callbacks=[RandomLTDCallback("ds_config.json")])
    trainer.train()

It does what ``RandomLTDTrainer`` does, from a callback: converts the model when the Trainer is built (``convert``;
a PEFT model's base layers are found through the adapter), advances MSLG once per optimizer step from exact
layer-token counts, uses LayerToken LR as the Trainer's scheduler when the config enables it, adds ``random_ltd/*``
to every log (so every ``report_to`` integration gets them; W&B runs offline without credentials), and saves and
restores its state (``random_ltd_state.json``) in Trainer checkpoints.

A callback is not handed its Trainer, so at ``on_init_end`` it finds the Trainer that is calling it (the caller's
frame) and :meth:`RandomLTDCallback.attach` es itself: it moves itself first among the callbacks (its metrics must be
in the logs before the reporting integrations see them) and takes over ``create_scheduler`` (LayerToken LR) and
``train`` (to know the checkpoint a run resumes from) on that Trainer instance only. ``attach(trainer)`` can also be
called by hand, e.g. for a callback added after the Trainer was built.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from transformers import Trainer

from random_ltd.integrations.transformers.trainer import STATE_FILE, _RandomLTDCallback, _Run, _setup
from random_ltd.schedules import LayerTokenLR

__all__ = ["RandomLTDCallback"]

logger = logging.getLogger("random_ltd")


def _calling_trainer() -> Trainer | None:
    """The Trainer whose ``__init__`` is running ``on_init_end`` (found in the call stack), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class RandomLTDCallback(_RandomLTDCallback):
    """random-LTD as a ``TrainerCallback`` (see the module docstring).

    Args:
        config: the random-LTD block, a whole DeepSpeed-style config (dict or JSON path) or a ``RandomLTDConfig``;
            default: the random-LTD block of the DeepSpeed config in ``TrainingArguments(deepspeed=...)``.
        layers: the transformer layers (class or modules) when auto-detection does not fit.

    Raises (when the Trainer is built):
        ValueError: the config in two places, or no config at all.
        random_ltd.ConfigError: an invalid block (the message names the key path).
    """

    def __init__(self, config: Any = None, *, layers: Any = None) -> None:
        self.config = config
        self.layers = layers
        self.run: _Run | None = None  # set by attach
        self.device = None
        self.trainer: Trainer | None = None

    # ---- wiring ----------------------------------------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> None:
        """Convert ``trainer.model`` and wire this callback into ``trainer`` (idempotent)."""
        if self.trainer is trainer:
            return
        if self.trainer is not None:
            raise ValueError("RandomLTDCallback: one callback per Trainer (this one is attached to another)")
        self.trainer = trainer
        self.run = _setup(trainer.model, trainer.args, self.config, self.layers)
        self.device = trainer.args.device
        handler = trainer.callback_handler
        if self not in handler.callbacks:
            handler.callbacks.insert(0, self)
        else:  # first: the metrics go into the logs before the reporting integrations read them
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
        if self.run.lr_config is not None:
            self._take_over_scheduler(trainer)
        train = trainer.train

        def train_and_note_resume(resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
            resume = resume_from_checkpoint
            if resume is True or resume == "True":
                from transformers.trainer_utils import get_last_checkpoint

                resume = get_last_checkpoint(trainer.args.output_dir)
            self.run.resume_dir = resume if isinstance(resume, (str, os.PathLike)) and resume else None
            return train(resume_from_checkpoint, *args, **kwargs)

        trainer.train = train_and_note_resume

    def _take_over_scheduler(self, trainer: Trainer) -> None:
        run = self.run
        if trainer.lr_scheduler is not None:  # optimizers=(opt, scheduler): the config wins, as for DeepSpeed
            from random_ltd.integrations.deepspeed.compat import replaced_lr_scheduler_message

            logger.warning(replaced_lr_scheduler_message(trainer.lr_scheduler))
            trainer.lr_scheduler = None

        def create_scheduler(num_training_steps: int, optimizer: Any = None):
            if not isinstance(trainer.lr_scheduler, LayerTokenLR):
                trainer.lr_scheduler = run.make_lr_scheduler(optimizer if optimizer is not None else trainer.optimizer)
                trainer._created_lr_scheduler = True
            return trainer.lr_scheduler

        trainer.create_scheduler = create_scheduler

    # ---- events ------------------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        if self.trainer is None:
            trainer = _calling_trainer()
            if trainer is None:
                raise RuntimeError("RandomLTDCallback: could not find the Trainer building it; call "
                                   "callback.attach(trainer) after building the Trainer")
            self.attach(trainer)
        return control

    def _require_attached(self) -> _Run:
        if self.run is None:
            raise RuntimeError("RandomLTDCallback is not attached to a Trainer: pass it in Trainer(callbacks=[...]) "
                               "or call callback.attach(trainer)")
        return self.run

    def on_train_begin(self, args, state, control, **kwargs):
        self._require_attached()
        if kwargs.get("optimizer") is not None and self.run.optimizer is None:
            self.run.optimizer = kwargs["optimizer"]
        return super().on_train_begin(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add ``random_ltd/*`` to training logs (this callback runs first, so every reporter receives them)."""
        if logs is not None and "loss" in logs and self.run is not None and self.run.monitor.last:
            logs.update(self.run.monitor.last)
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
                last.update(self.run.monitor.last)  # Trainer.log stored a copy of the logs before calling us
        return control

    def on_save(self, args, state, control, **kwargs):
        """Write ``random_ltd_state.json`` next to the Trainer's checkpoint of this step."""
        if self.run is not None and args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                with open(os.path.join(folder, STATE_FILE), "w") as f:
                    json.dump(self.run.state_dict(), f)
        return control

    def random_ltd_summary(self) -> str:
        """One line: steps, kept length, layer-tokens consumed vs baseline, saving, throughput."""
        run = self._require_attached()
        return run.monitor.summary(run)
