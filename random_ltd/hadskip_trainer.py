"""HadSkip three-stage training (paper section 4.3, appendix B) and evaluation with real skipping.

Stage 1: fine-tune the backbone (gates off; the model is bitwise the plain backbone).
Stage 2: freeze everything but the gates; train them on the task loss alone (no budget).
Stage 3: train everything with the homotopic budget ``beta (mean layers used - k)^2``, ``k = L, L-1, ..., s``, and
knowledge distillation from the stage-1 model: ``L_t + a1 L_p + a2 L_h + a3 L_att + a4 L_emb``.

The model is any ``nn.Module`` holding :class:`~random_ltd.layers.hadskip.HadSkipLayer` s whose
``forward(input_ids, attention_mask)`` returns a :class:`~random_ltd.layers.hadskip.HadSkipOutput` (the Hugging Face
adapter ``random_ltd.integrations.transformers.hadskip.HadSkipForSequenceClassification`` does). Batches come from a
function ``step -> {"input_ids", "attention_mask", "labels"}``, so a stage resumed from its checkpoint sees the same
batches, and with the saved RNG state draws the same gates, as an uninterrupted run.

Checkpoints: ``<dir>/stage{n}.pt`` holds the model, optimizer, homotopic state, RNG state and step; it is written
every ``save_every`` steps and at the end of the stage (``complete: True``). A stage can run alone: ``init_from``
names the previous stage's checkpoint (stage 3 also takes its teacher from the stage-1 checkpoint).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from random_ltd.config import HadSkipConfig
from random_ltd.layers.hadskip import HadSkipOutput, budget_penalty, hadskip_layers, set_gating, set_real_skip
from random_ltd.schedules.homotopic import HomotopicBudget

__all__ = ["HadSkipTrainer", "evaluate", "kd_losses"]

Batch = dict[str, torch.Tensor]

_CKPT_FORMAT = "random_ltd.hadskip/1"


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE over real tokens (``mask`` [b, s] nonzero) and features of ``[b, s, ...]`` tensors."""
    diff = (a.float() - b.float()).square()
    if mask is None:
        return diff.mean()
    m = (mask != 0).float().view(*mask.shape, *([1] * (diff.dim() - 2)))
    per_token = diff[0, 0].numel()
    return (diff * m).sum() / (m.sum() * per_token).clamp_min(1.0)


def kd_losses(student: HadSkipOutput, teacher: HadSkipOutput) -> dict[str, torch.Tensor]:
    """Distillation losses of appendix B; each is exactly 0 when ``student`` and ``teacher`` outputs are equal.

    * ``p``: ``KL(softmax(teacher) || softmax(student))`` per sequence, batch mean.
    * ``h``: mean over layers of the masked MSE of layer outputs.
    * ``att``: mean over layers of the MSE of head-averaged attention maps over the (sequence, layer) pairs the
      student keeps (a skipped layer has no attention map at inference); weights are the detached gates, so this
      loss does not push gates toward skipping. Rows of padding queries are excluded. 0 without attention maps.
    * ``emb``: masked MSE of embedding outputs (0 when either side has none).
    """
    mask = student.mask
    log_s = F.log_softmax(student.logits.float(), dim=-1)
    log_t = F.log_softmax(teacher.logits.float(), dim=-1)
    zero = log_s.new_zeros(())
    losses = {"p": (log_t.exp() * (log_t - log_s)).sum(-1).mean()}
    if len(student.hidden_states) != len(teacher.hidden_states):
        raise ValueError(f"student has {len(student.hidden_states)} hidden states, teacher "
                         f"{len(teacher.hidden_states)}")
    h = [_masked_mse(a, b, mask) for a, b in zip(student.hidden_states, teacher.hidden_states)]
    losses["h"] = torch.stack(h).mean() if h else zero
    att = []
    for i, (a, b) in enumerate(zip(student.attentions, teacher.attentions)):
        if a is None or b is None:
            continue
        w = torch.ones(a.shape[0], device=a.device) if student.gates is None else student.gates[:, i].detach().float()
        rows = (a.float() - b.float()).square().mean(-1)  # [b, s]: per query row
        if mask is not None:
            rows = rows * (mask != 0).float()
            denom = (mask != 0).float().sum(-1).clamp_min(1.0)
        else:
            denom = torch.full((a.shape[0],), float(a.shape[1]), device=a.device)
        att.append(((rows.sum(-1) / denom) * w).sum() / w.sum().clamp_min(1.0))
    losses["att"] = torch.stack(att).mean() if att else zero
    if student.embeddings is not None and teacher.embeddings is not None:
        losses["emb"] = _masked_mse(student.embeddings, teacher.embeddings, mask)
    else:
        losses["emb"] = zero
    return losses


def _drop_cached_activations(model: nn.Module) -> None:
    """Forget tensors that modules keep from their last forward (gates, attention maps): deepcopy rejects them."""
    for m in model.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.grad_fn is not None:
                setattr(m, name, None)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])


class HadSkipTrainer:
    """Runs HadSkip's stages on ``model`` with the ``hadskip`` config ``config``.

    Args:
        model: a HadSkip model (see the module docstring); it is trained in place.
        config: the validated ``hadskip`` block (budget, weights, homotopic schedule, stage steps and LRs).
        optimizer_factory: ``(params, lr) -> optimizer`` (default ``torch.optim.AdamW(params, lr)``).
        log: called with one dict per optimizer step (stage, step, loss parts, budget, mean layers).
    """

    def __init__(self, model: nn.Module, config: HadSkipConfig,
                 optimizer_factory: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer] | None = None,
                 log: Callable[[dict[str, float]], None] | None = None) -> None:
        if not isinstance(config, HadSkipConfig):
            raise TypeError(f"config must be a HadSkipConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.layers = hadskip_layers(model)
        if not self.layers:
            raise ValueError("model has no HadSkipLayer: wrap its layers first")
        if config.num_layers is not None and config.num_layers != len(self.layers):
            raise ValueError(f"hadskip.num_layers is {config.num_layers} but the model has {len(self.layers)} "
                             f"HadSkip layers")
        if config.budget > len(self.layers):
            raise ValueError(f"hadskip.budget {config.budget} > {len(self.layers)} layers")
        self.optimizer_factory = optimizer_factory or (lambda params, lr: torch.optim.AdamW(params, lr=lr))
        self.log = log
        self.teacher: nn.Module | None = None

    # ---------------------------------------------------------------- parameters per stage
    def _gate_params(self) -> list[nn.Parameter]:
        return [p for m in self.layers for p in m.gate.parameters()]

    def _set_trainable(self, stage: int) -> list[nn.Parameter]:
        gate_ids = {id(p) for p in self._gate_params()}
        for p in self.model.parameters():
            is_gate = id(p) in gate_ids
            p.requires_grad_(not is_gate if stage == 1 else is_gate if stage == 2 else True)
        return [p for p in self.model.parameters() if p.requires_grad]

    def homotopic_schedule(self, steps: int) -> HomotopicBudget:
        """Stage 3's budget schedule (a single budget ``s`` when homotopy is disabled)."""
        h, num_layers, s = self.config.homotopic, len(self.layers), self.config.budget
        if not h.enabled:
            return HomotopicBudget(num_layers, s, steps_per_stage=1, start=s)
        # the even split: half of stage 3 over the intermediate budgets, the rest at s ('steps' default, and the
        # convergence mode's default cap, so convergence can only move earlier than the fixed schedule)
        n = len(HomotopicBudget(num_layers, s, steps_per_stage=1, stride=h.stride).budgets)
        even = max(1, steps // (2 * max(1, n - 1)))
        if h.step_on == "convergence":
            cap = h.max_steps_per_stage if h.max_steps_per_stage is not None else even
            return HomotopicBudget(num_layers, s, step_on="convergence", tolerance=h.convergence_tolerance,
                                   patience=h.patience, max_steps_per_stage=cap, stride=h.stride)
        per = h.steps_per_stage if h.steps_per_stage is not None else even
        return HomotopicBudget(num_layers, s, steps_per_stage=per, stride=h.stride)

    # ---------------------------------------------------------------- checkpoints
    @staticmethod
    def checkpoint_path(directory: str | os.PathLike[str], stage: int) -> Path:
        """``<directory>/stage{stage}.pt``."""
        return Path(directory) / f"stage{stage}.pt"

    def _save(self, path: Path, stage: int, step: int, optimizer: torch.optim.Optimizer,
              schedule: HomotopicBudget | None, complete: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": _CKPT_FORMAT, "stage": stage, "step": step, "complete": complete,
                 "model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
                 "homotopic": schedule.state_dict() if schedule is not None else None, "rng": _rng_state(),
                 "config": self.config.model_dump()}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    @staticmethod
    def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
        """Read a stage checkpoint (CPU tensors)."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != _CKPT_FORMAT:
            raise ValueError(f"{path} is not a HadSkip stage checkpoint")
        return state

    def load_model(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load the model weights of a stage checkpoint (e.g. to start the next stage from it)."""
        state = self.load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        return state

    def make_teacher(self, stage1_checkpoint: str | os.PathLike[str] | None = None) -> nn.Module:
        """The stage-1 model, frozen, gates off: a copy of ``model`` with the stage-1 weights (or its current ones)."""
        _drop_cached_activations(self.model)
        teacher = copy.deepcopy(self.model)
        if stage1_checkpoint is not None:
            teacher.load_state_dict(self.load_checkpoint(stage1_checkpoint)["model"])
        set_gating(teacher, False)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        return teacher

    # ---------------------------------------------------------------- training
    def train_stage(self, stage: int, batches: Callable[[int], Batch], *, steps: int | None = None,
                    checkpoint_dir: str | os.PathLike[str] | None = None, save_every: int | None = None,
                    init_from: str | os.PathLike[str] | None = None, resume: bool = True,
                    stop_after: int | None = None) -> list[dict[str, float]]:
        """Run stage ``stage`` (1, 2 or 3) for ``steps`` optimizer steps (default: ``config.stages.stage{n}_steps``).

        ``init_from``: checkpoint whose model weights start this stage (ignored when resuming this stage's own
        checkpoint). ``stop_after``: stop (after saving) once this many steps are done in total, to simulate or
        schedule an interruption. Stage 3 needs a teacher: :meth:`make_teacher` first, or it is built from
        ``<checkpoint_dir>/stage1.pt`` when that exists, else from the model as it is now.

        Returns the per-step logs of the steps run in this call.
        """
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        cfg = self.config
        steps = getattr(cfg.stages, f"stage{stage}_steps") if steps is None else steps
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        lr = getattr(cfg.stages, f"stage{stage}_lr")
        ckpt = self.checkpoint_path(checkpoint_dir, stage) if checkpoint_dir is not None else None

        start = 0
        resumed = None
        if ckpt is not None and resume and ckpt.exists():
            resumed = self.load_checkpoint(ckpt)
            if resumed["stage"] != stage:
                raise ValueError(f"{ckpt} holds stage {resumed['stage']}, not {stage}")
            self.model.load_state_dict(resumed["model"])
            start = int(resumed["step"])
        elif init_from is not None:
            self.load_model(init_from)

        set_gating(self.model, stage != 1)
        params = self._set_trainable(stage)
        optimizer = self.optimizer_factory(params, lr)
        schedule = self.homotopic_schedule(steps) if stage == 3 else None
        if resumed is not None:
            optimizer.load_state_dict(resumed["optimizer"])
            if schedule is not None and resumed["homotopic"] is not None:
                schedule.load_state_dict(resumed["homotopic"])
            _set_rng_state(resumed["rng"])
        if stage == 3 and self.teacher is None:
            stage1 = self.checkpoint_path(checkpoint_dir, 1) if checkpoint_dir is not None else None
            self.make_teacher(stage1 if stage1 is not None and stage1.exists() else None)
        needs_att = stage == 3 and cfg.alpha_att > 0

        logs: list[dict[str, float]] = []
        end = steps if stop_after is None else min(steps, stop_after)
        self.model.train()
        for step in range(start, end):
            batch = batches(step)
            out: HadSkipOutput = self.model(batch["input_ids"], batch.get("attention_mask"))
            task = F.cross_entropy(out.logits.float(), batch["labels"])
            loss = task
            entry = {"stage": stage, "step": step, "task": task.item()}
            if stage >= 2:
                entry["mean_layers"] = out.gates.sum(1).mean().item()
            if stage == 3:
                with torch.no_grad():
                    t_out: HadSkipOutput = self.teacher(batch["input_ids"], batch.get("attention_mask"))
                if needs_att and not any(a is not None for a in out.attentions):
                    raise ValueError("hadskip.alpha_att > 0 but the model returns no attention maps (use eager "
                                     "attention, or set alpha_att to 0)")
                kd = kd_losses(out, t_out)
                budget_term = budget_penalty(out.gates, schedule.budget, cfg.beta, unit=cfg.beta_unit)
                loss = (loss + cfg.alpha_p * kd["p"] + cfg.alpha_h * kd["h"] + cfg.alpha_att * kd["att"]
                        + cfg.alpha_emb * kd["emb"] + budget_term)
                entry.update({f"kd_{k}": v.item() for k, v in kd.items()})
                entry.update(budget=schedule.budget, budget_term=budget_term.item(),
                             budget_gap=abs(entry["mean_layers"] - schedule.budget))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            factor = cfg.stages.lr_factor(stage, step)
            for group in optimizer.param_groups:  # relative to each group's own LR (a factory may set several)
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
            entry["lr"] = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if schedule is not None:
                schedule.step(entry["budget_gap"])  # convergence: |mean layers used - k| (layers)
            entry["loss"] = loss.item()
            if not math.isfinite(entry["loss"]):
                raise FloatingPointError(f"stage {stage} step {step}: non-finite loss {entry}")
            logs.append(entry)
            if self.log is not None:
                self.log(entry)
            if ckpt is not None and save_every and (step + 1) % save_every == 0 and step + 1 < end:
                self._save(ckpt, stage, step + 1, optimizer, schedule, complete=False)
        if ckpt is not None:
            self._save(ckpt, stage, end, optimizer, schedule, complete=end >= steps)
        for p in self.model.parameters():
            p.requires_grad_(True)
        return logs


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], *, gating: bool = True, real_skip: bool = True,
             num_classes: int | None = None) -> dict[str, Any]:
    """Accuracy, layers used per sequence, per-layer usage and wall time of ``model`` in eval mode.

    With ``gating`` the deterministic gate rule decides (keep iff P(keep) >= 0.5); ``real_skip`` runs only the kept
    sequences through each layer (else the masked computation). ``seconds`` is the summed forward wall time.
    """
    model.eval()
    set_gating(model, gating)
    set_real_skip(model, real_skip)
    layers = hadskip_layers(model)
    correct = total = 0
    seconds = 0.0
    per_seq: list[int] = []
    preds: list[int] = []
    usage = torch.zeros(len(layers), dtype=torch.float64)
    calls = 0
    for batch in batches:
        t0 = time.perf_counter()
        out: HadSkipOutput = model(batch["input_ids"], batch.get("attention_mask"))
        seconds += time.perf_counter() - t0
        pred = out.logits.argmax(-1)
        preds += pred.tolist()
        correct += int((pred == batch["labels"]).sum())
        total += int(pred.numel())
        calls += sum(m.last_calls for m in layers)
        if out.gates is not None:
            per_seq += out.gates.sum(1).long().tolist()
            usage += out.gates.double().sum(0)
        else:
            per_seq += [len(layers)] * int(pred.numel())
            usage += pred.numel()
    model.train()
    return {"accuracy": correct / max(1, total), "n": total, "mean_layers": sum(per_seq) / max(1, len(per_seq)),
            "layers_per_sequence": per_seq, "predictions": preds, "layer_usage": (usage / max(1, total)).tolist(),
            "layer_calls": calls, "seconds": seconds}
