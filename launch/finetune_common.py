"""Shared by launch/finetune_gpt2.py and launch/finetune_vit.py: run one arm through ``RandomLTDTrainer``, then
write the baseline-vs-random-LTD table, JSON and plot.

The random-LTD block comes from a DeepSpeed JSON config; the launcher fits it to the run (``fit_block``): the
model's layer count, the full sequence length, the paper's keep start ratio and the 80% ramp (Appendix D.3/D.4).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from random_ltd.integrations.transformers import RandomLTDTrainer


def fit_block(ds_config: dict, *, enabled: bool, num_layers: int, seq_len: int, steps: int, start_ratio: float,
              ramp: float, seq_per_step: int) -> dict:
    """A copy of ``ds_config`` whose random-LTD block matches the run (``enabled=False``: the counting baseline)."""
    cfg = copy.deepcopy(ds_config)
    block = cfg["data_efficiency"]["data_routing"]["random_ltd"]
    block["enabled"] = enabled
    block["total_layer_num"] = num_layers
    block["random_ltd_layer_id"] = list(range(1, num_layers - 1))
    block["random_ltd_layer_num"] = num_layers - 2
    start = max(seq_per_step, int(round(start_ratio * seq_len)) // seq_per_step * seq_per_step)
    sched = block.setdefault("random_ltd_schedule", {})
    sched.update({"min_value": start, "max_value": seq_len, "schedule_type": "fixed_linear"})
    sched["schedule_config"] = {"require_steps": max(1, math.ceil(ramp * steps)), "seq_per_step": seq_per_step}
    return cfg


class _Curve(TrainerCallback):
    """Validation loss (and accuracy) against consumed layer-tokens at every evaluation."""

    def __init__(self) -> None:
        self.trainer: RandomLTDTrainer | None = None
        self.points: list[dict] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        sched = self.trainer.random_ltd.schedule
        point = {"step": state.global_step, "layer_tokens": sched.consumed_layer_tokens,
                 "val_loss": float(metrics["eval_loss"])}
        if "eval_accuracy" in metrics:
            point["val_accuracy"] = float(metrics["eval_accuracy"])
        self.points.append(point)


def run_arm(name: str, model: torch.nn.Module, ds_config: dict, train_set, eval_set, *, out: Path, steps: int,
            batch: int, lr: float, eval_every: int, seed: int, compute_metrics=None, deepspeed: bool = False) -> dict:
    """Train one arm with constant LR (the paper's fine-tuning setting) and return its result dict."""
    curve = _Curve()
    config_path = out / f"{name}_ds_config.json"
    config_path.write_text(json.dumps(ds_config, indent=1))
    args = TrainingArguments(
        output_dir=str(out / f"{name}_trainer"), per_device_train_batch_size=batch, per_device_eval_batch_size=64,
        max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        eval_strategy="steps", eval_steps=eval_every, logging_steps=eval_every, save_strategy="no", report_to=[],
        use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        deepspeed=str(config_path) if deepspeed else None)
    trainer = RandomLTDTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                               compute_metrics=compute_metrics, callbacks=[curve],
                               random_ltd_config=None if deepspeed else str(config_path))
    curve.trainer = trainer
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    final = trainer.evaluate()
    sched = trainer.random_ltd.schedule
    result = {"arm": name, "steps": sched.step, "final_val_loss": float(final["eval_loss"]),
              "consumed_layer_tokens": sched.consumed_layer_tokens,
              "baseline_layer_tokens": sched.baseline_layer_tokens, "saved_percent": 100 * sched.saved_fraction,
              "wall_s": wall, "curve": curve.points, "summary": trainer.random_ltd_summary()}
    if "eval_accuracy" in final:
        result["final_val_accuracy"] = float(final["eval_accuracy"])
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(result["summary"], flush=True)
    return result


def write_outputs(results: list[dict], out: Path, title: str, command: str) -> str:
    """table.md, results.json and val_loss_vs_layer_tokens.png in ``out``; returns the table."""
    base = results[0]
    acc = "final_val_accuracy" in base
    head = "| arm | steps | final val loss |" + (" val accuracy |" if acc else "") + \
        " layer-tokens | saved vs baseline | wall time (s) | wall saved |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(f"| {r['arm']} | {r['steps']} | {r['final_val_loss']:.4f} |"
                     + (f" {100 * r['final_val_accuracy']:.2f}% |" if acc else "")
                     + f" {r['consumed_layer_tokens']:,} | "
                     f"{100 * (1 - r['consumed_layer_tokens'] / base['consumed_layer_tokens']):.1f}% | "
                     f"{r['wall_s']:.1f} | {100 * (1 - r['wall_s'] / base['wall_s']):.1f}% |")
    table = "\n".join(lines)
    import platform

    device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    (out / "table.md").write_text(f"# {title}\n\nCommand: `{command}`\n\nDevice: {device}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps({"title": title, "command": command, "arms": results}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r, color in zip(results, ("k", "C0", "C1")):
        ax.plot([p["layer_tokens"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], color=color,
                marker="o", ms=3, label=r["arm"])
    ax.set_xlabel("consumed layer-tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_loss_vs_layer_tokens.png", dpi=120)
    return table


def load_ds_config(path: str) -> dict[str, Any]:
    """The DeepSpeed config at ``path``, read as DeepSpeed reads it (Hjson, duplicate keys rejected)."""
    from random_ltd.config import load_deepspeed_config

    return load_deepspeed_config(path)
