"""The paper's ablations (random-LTD, arXiv 2211.11586, sections 5.1-5.5) at a size that runs on a CPU.

Studies (each arm trains the same tiny GPT from the same initialisation on the same batches in the same order)::

    tokenbypass  random-LTD vs TokenBypass at equal saving, vs the baseline (paper 5.1, Fig. 4): constant drop of
                 half the tokens, "set 1" on the sandwich layers (L/2-1 .. L-2, 0-based), "set 2" on layers 1 .. L-2
    layers       MSLG random-LTD on all layers / all but first / all but last / all but first and last (Table 5)
    schedule     MSLG vs a constant kept length at equal LayerToken saving, plus a constant ~10 points lower
                 (Table 6)
    lr           random-LTD with LayerToken LR vs with the iteration LR, vs the baseline (5.5, Fig. 6)
    all          the four (arms shared between studies run once)

Usage (single process, DeepSpeed engine on CPU through ``random_ltd.initialize``)::

    python launch/ablations.py --study all --steps 200 --out benchmarks/results/ablations_cpu

Every random-LTD arm uses the recipe's LR mode (LayerToken LR with the Appendix C budget of its own plan) unless
the arm says otherwise; the baseline uses the recipe's iteration schedule. Writes ``results.json``, ``results.md``
(one table per study: final validation loss / perplexity, layer-tokens, % saved, wall time) and
``<study>_val_loss_vs_layer_tokens.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import random_ltd  # noqa: E402
from launch.corpus import VOCAB_SIZE, batch_at, load_corpus  # noqa: E402
from launch.model import GPT, GPTConfig  # noqa: E402
from launch.stats import compare, format_comparison  # noqa: E402
from random_ltd.config import RandomLTDConfig  # noqa: E402
from random_ltd.schedules import planned_layer_tokens, random_ltd_budget  # noqa: E402

STUDIES = ("tokenbypass", "layers", "schedule", "lr")
RLTD = ("data_efficiency", "data_routing", "random_ltd")


@dataclass(frozen=True)
class Arm:
    """One training run of a study. ``kept``: 'mslg' (the recipe's growth), 'half' (constant s/2), 'match' (the
    constant with the MSLG arm's saving), 'match-10' (the constant saving 10 points less)."""

    name: str
    dropping: bool = True
    layer_set: str = "all_but_first_and_last"
    kept: str = "mslg"
    token_bypass: bool = False
    lr: str = "layer_token"  # or "iteration"

    @property
    def key(self) -> tuple:
        return (self.dropping, self.layer_set, self.kept, self.token_bypass, self.lr) if self.dropping else ("base",)


# The differences each study is about (the paper's comparisons), tested over seeds when there are >= 2:
# mean(a) - mean(b) of the final validation loss, Welch's t-test and a bootstrap interval (launch/stats.py).
STUDY_CLAIMS: dict[str, tuple[tuple[str, str], ...]] = {
    "tokenbypass": (("set 1: random-LTD (sandwich, const s/2)", "set 1: TokenBypass (sandwich, const s/2)"),
                    ("set 2: random-LTD (layers 1..L-2, const s/2)", "set 2: TokenBypass (layers 1..L-2, const s/2)")),
    "layers": (("all but first and last", "all layers"), ("all but first and last", "all but first"),
               ("all but first and last", "all but last")),
    "schedule": (("MSLG", "constant, equal saving"), ("MSLG", "constant, 10 points less saving")),
    "lr": (("random-LTD, LayerToken LR", "random-LTD, iteration LR"), ("random-LTD, LayerToken LR", "baseline")),
}

BASELINE = Arm("baseline", dropping=False, lr="iteration")
DEFAULT = Arm("random-LTD (MSLG, LayerToken LR)")


def study_arms(study: str) -> list[Arm]:
    """The arms of one study (the baseline first)."""
    if study == "tokenbypass":
        return [BASELINE,
                Arm("set 1: random-LTD (sandwich, const s/2)", layer_set="sandwich", kept="half"),
                Arm("set 1: TokenBypass (sandwich, const s/2)", layer_set="sandwich", kept="half", token_bypass=True),
                Arm("set 2: random-LTD (layers 1..L-2, const s/2)", kept="half"),
                Arm("set 2: TokenBypass (layers 1..L-2, const s/2)", kept="half", token_bypass=True)]
    if study == "layers":
        return [BASELINE, Arm("all layers", layer_set="all"), Arm("all but first", layer_set="all_but_first"),
                Arm("all but last", layer_set="all_but_last"), replace(DEFAULT, name="all but first and last")]
    if study == "schedule":
        return [BASELINE, replace(DEFAULT, name="MSLG"), Arm("constant, equal saving", kept="match"),
                Arm("constant, 10 points less saving", kept="match-10")]
    if study == "lr":
        return [BASELINE, Arm("random-LTD, iteration LR", lr="iteration"),
                replace(DEFAULT, name="random-LTD, LayerToken LR")]
    raise ValueError(f"study must be one of {STUDIES} or 'all', got {study!r}")


# --------------------------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Model and run size shared by every arm."""

    steps: int = 200
    batch: int = 16
    seq_length: int = 256
    num_layers: int = 8
    hidden_size: int = 128
    num_attention_heads: int = 4
    eval_interval: int = 25
    eval_iters: int = 8
    special_token_ids: tuple[int, ...] = (10,)  # "\n", the verse separator of the embedded corpus


def _block(ds: dict) -> dict:
    d = ds
    for k in RLTD:
        d = d.setdefault(k, {})
    return d


def scaled_recipe(recipe: dict, s: Settings) -> dict:
    """The recipe resized to ``s``: one process, batch, steps, warmup and MSLG growth scaled with the step count."""
    ds = copy.deepcopy(recipe)
    recipe_steps = ds.get("scheduler", {}).get("params", {}).get("total_num_steps", s.steps)
    ds["train_batch_size"] = s.batch
    ds["train_micro_batch_size_per_gpu"] = s.batch
    ds["gradient_accumulation_steps"] = 1
    ds.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = True  # no JIT FusedAdam on CPU
    if "scheduler" in ds:
        p = ds["scheduler"]["params"]
        if "warmup_num_steps" in p:
            p["warmup_num_steps"] = max(1, round(p["warmup_num_steps"] * s.steps / recipe_steps))
        if "total_num_steps" in p:
            p["total_num_steps"] = s.steps
    block = _block(ds)
    recipe_max = block.get("random_ltd_schedule", {}).get("max_value", s.seq_length)
    sched = block.setdefault("random_ltd_schedule", {})
    params = sched.setdefault("schedule_config", {})
    step = params.get("seq_per_step", 16)
    sched["max_value"] = s.seq_length
    sched["min_value"] = max(step, round(sched.get("min_value", 128) * s.seq_length / recipe_max / step) * step)
    if "require_steps" in params:
        params["require_steps"] = max(1, round(params["require_steps"] * s.steps / recipe_steps))
    block["total_layer_num"] = s.num_layers
    for k in ("random_ltd_layer_id", "random_ltd_layer_num", "layer_keep_ratios"):
        block.pop(k, None)
    return ds


def _warmup_steps(ds: dict) -> int:
    return int(ds.get("scheduler", {}).get("params", {}).get("warmup_num_steps", 0))


def _rltd_config(ds: dict) -> RandomLTDConfig:
    return RandomLTDConfig.from_deepspeed(ds)


def planned(ds: dict, s: Settings) -> tuple[int, int]:
    """Planned (consumed, baseline) layer-tokens of a config's random-LTD block over the run."""
    return planned_layer_tokens(_rltd_config(ds), s.steps, s.batch, s.seq_length)


def constant_kept_for_saving(ds: dict, s: Settings, target_saving: float) -> int:
    """The constant kept length whose planned LayerToken saving is closest to ``target_saving`` (same layers)."""
    best, best_err = 1, math.inf
    # the saving is linear in the kept length: try the two integers around the exact solution
    n = len(_rltd_config(ds).layer_ids)
    exact = s.seq_length * (1 - target_saving * s.num_layers / n)
    for k in {max(1, min(s.seq_length, math.floor(exact) + d)) for d in (-1, 0, 1, 2)}:
        trial = _with_constant(ds, k)
        consumed, base = planned(trial, s)
        err = abs((1 - consumed / base) - target_saving)
        if err < best_err:
            best, best_err = k, err
    return best


def _with_constant(ds: dict, kept: int) -> dict:
    ds = copy.deepcopy(ds)
    sched = _block(ds)["random_ltd_schedule"]
    sched["schedule_type"] = "constant"
    sched["min_value"] = kept
    sched["schedule_config"].pop("require_steps", None)
    sched["schedule_config"].pop("require_tokens", None)
    return ds


def arm_config(recipe: dict, arm: Arm, s: Settings) -> dict:
    """The DeepSpeed config of one arm (the recipe already scaled by ``scaled_recipe``)."""
    ds = copy.deepcopy(recipe)
    block = _block(ds)
    lr_block = block.setdefault("layer_token_lr_schedule", {})
    if not arm.dropping:
        block["enabled"] = False
        lr_block["enabled"] = False
        return ds
    block["enabled"] = True
    block["layer_set"] = arm.layer_set
    if arm.kept == "half":
        ds = _with_constant(ds, s.seq_length // 2)
    elif arm.kept in ("match", "match-10"):
        consumed, base = planned(ds, s)  # the MSLG arm on the same layers
        target = 1 - consumed / base - (0.10 if arm.kept == "match-10" else 0.0)
        ds = _with_constant(ds, constant_kept_for_saving(ds, s, target))
    elif arm.kept != "mslg":
        raise ValueError(f"arm {arm.name}: unknown kept {arm.kept!r}")
    block = _block(ds)
    if arm.token_bypass:
        block["token_bypass"] = {"enabled": True, "special_token_ids": list(s.special_token_ids)}
    lr_block = block.setdefault("layer_token_lr_schedule", {})
    if arm.lr == "layer_token":
        budget = random_ltd_budget(_rltd_config(ds), warmup_steps=_warmup_steps(ds), total_steps=s.steps,
                                   batch_size=s.batch, seq_len=s.seq_length)
        lr_block.update(enabled=True, warmup_type="linear", total_layer_tokens=budget.total_layer_tokens,
                        warmup_layer_tokens=budget.warmup_layer_tokens)
        lr_block.setdefault("decay_type", "linear")
    elif arm.lr == "iteration":
        lr_block["enabled"] = False
    else:
        raise ValueError(f"arm {arm.name}: unknown lr {arm.lr!r}")
    return ds


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------


def ensure_dist_env() -> None:
    """A one-process 'world' for DeepSpeed's env:// rendezvous (only the variables that are not set)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)


@torch.no_grad()
def evaluate(engine, valid: torch.Tensor, s: Settings) -> float:
    engine.eval()
    losses = [float(F.cross_entropy(engine(x).flatten(0, 1).float(), y.flatten()))
              for x, y in (batch_at(valid, s.seq_length, s.batch, i, seed=10_000 + i) for i in range(s.eval_iters))]
    engine.train()
    return sum(losses) / len(losses)


def train_arm(ds: dict, s: Settings, seed: int, data: tuple[torch.Tensor, torch.Tensor], log=print) -> dict:
    """Train one arm; returns its validation curve against consumed layer-tokens and its totals."""
    ensure_dist_env()
    train, valid = data
    torch.manual_seed(seed)
    model = GPT(GPTConfig(VOCAB_SIZE, s.num_layers, s.hidden_size, s.num_attention_heads, s.seq_length))
    engine, _, _, _ = random_ltd.initialize(model=model, model_parameters=model.parameters(), config=ds)
    sched, state = engine.random_ltd_schedule, engine.random_ltd_state
    bypass = isinstance(state, random_ltd.layers.TokenBypassState) and state.enabled
    curve = [{"step": 0, "layer_tokens": 0, "val_loss": evaluate(engine, valid, s), "lr": engine.get_lr()[0]}]
    train_wall = 0.0
    for step in range(s.steps):
        t0 = time.perf_counter()
        tokens, labels = batch_at(train, s.seq_length, s.batch, step, seed=seed)
        logits = engine(tokens)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
        per_token = per_token.view_as(labels)
        loss = per_token.mean()
        if bypass:
            state.update(tokens, per_token)  # loss at t credited to the id at t (it predicts the next byte)
        engine.backward(loss)
        engine.step()
        train_wall += time.perf_counter() - t0
        done = step + 1
        if done % s.eval_interval == 0 or done == s.steps:
            val = evaluate(engine, valid, s)
            curve.append({"step": done, "layer_tokens": sched.consumed_layer_tokens, "val_loss": val,
                          "train_loss": loss.item(), "lr": engine.get_lr()[0]})
            log(f"    step {done:4d} | train {loss.item():.4f} | val {val:.4f} | saved "
                f"{100 * sched.saved_fraction:.1f}% | lr {engine.get_lr()[0]:.2e} | {train_wall:.0f}s")
    return {"final_val_loss": curve[-1]["val_loss"], "consumed_layer_tokens": sched.consumed_layer_tokens,
            "baseline_layer_tokens": sched.baseline_layer_tokens, "saved_percent": 100 * sched.saved_fraction,
            "train_wall_s": train_wall, "curve": curve}


# --------------------------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(arm_runs: list[dict]) -> dict:
    """Mean (and std over seeds) of an arm's per-seed results."""
    loss, loss_sd = _mean_std([r["final_val_loss"] for r in arm_runs])
    wall, _ = _mean_std([r["train_wall_s"] for r in arm_runs])
    return {"final_val_loss": loss, "final_val_loss_std": loss_sd, "perplexity": math.exp(loss),
            "consumed_layer_tokens": arm_runs[0]["consumed_layer_tokens"],
            "saved_percent": arm_runs[0]["saved_percent"], "train_wall_s": wall, "seeds": len(arm_runs)}


def markdown_table(study: str, rows: list[dict]) -> str:
    base_wall = next((r["train_wall_s"] for r in rows if r["arm"] == BASELINE.name), None)
    lines = [f"### {study}", "",
             "| arm | kept / layers | final val loss | val ppl | layer-tokens | saved | train wall (s) "
             "| wall vs base |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sd = f" ± {r['final_val_loss_std']:.4f}" if r["seeds"] > 1 else ""
        rel = f"{100 * (1 - r['train_wall_s'] / base_wall):+.1f}%" if base_wall else ""
        lines.append(f"| {r['arm']} | {r['detail']} | {r['final_val_loss']:.4f}{sd} | {r['perplexity']:.3f} | "
                     f"{r['consumed_layer_tokens']:,} | {r['saved_percent']:.1f}% | {r['train_wall_s']:.1f} | {rel} |")
    return "\n".join(lines) + "\n"


def _detail(ds: dict, arm: Arm) -> str:
    if not arm.dropping:
        return "full"
    cfg = _rltd_config(ds)
    sched = cfg.random_ltd_schedule
    kept = f"const {sched.min_value}" if sched.schedule_type == "constant" else \
        f"MSLG {sched.min_value}->{sched.max_value}"
    lr = "LT-LR" if arm.lr == "layer_token" else "iter LR"
    return f"{kept}, layers {list(cfg.layer_ids)}{', TokenBypass' if arm.token_bypass else ''}, {lr}"


def plot_study(study: str, rows: list[dict], runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        curve = runs[r["key"]][0]["curve"]
        ax.plot([p["layer_tokens"] for p in curve[1:]], [p["val_loss"] for p in curve[1:]], marker="o", ms=3,
                label=f"{r['arm']} ({r['saved_percent']:.0f}% saved)")
    ax.set_xlabel("consumed layer-tokens")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"ablation: {study} (seed {runs[rows[0]['key']][0]['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(studies: list[str], recipe: dict, s: Settings, seeds: list[int], out: str, log=print,
        only: list[str] | None = None) -> dict:
    """Run the studies (each distinct arm once per seed) and write results.json, results.md and the plots."""
    os.makedirs(out, exist_ok=True)
    base = scaled_recipe(recipe, s)
    data = load_corpus()
    runs: dict[tuple, list[dict]] = {}
    configs: dict[tuple, dict] = {}
    report: dict[str, Any] = {"settings": asdict(s), "seeds": seeds, "studies": {}}
    for study in studies:
        rows = []
        arms = study_arms(study)
        if only:
            unknown = sorted(set(only) - {a.name for st in STUDIES for a in study_arms(st)})
            if unknown:
                raise ValueError(f"--only: unknown arm names {unknown}")
            arms = [a for a in arms if a.name in only]
        for arm in arms:
            if arm.key not in runs:
                configs[arm.key] = arm_config(base, arm, s)
                runs[arm.key] = []
                for seed in seeds:
                    log(f"[{study}] {arm.name} (seed {seed})")
                    result = train_arm(configs[arm.key], s, seed, data, log=log)
                    runs[arm.key].append({"seed": seed, **result})
            rows.append({"arm": arm.name, "key": arm.key, "detail": _detail(configs[arm.key], arm),
                         **summarize(runs[arm.key])})
        by_arm = {r["arm"]: runs[r["key"]] for r in rows}
        tests = [compare(a, [r["final_val_loss"] for r in by_arm[a]], b, [r["final_val_loss"] for r in by_arm[b]])
                 for a, b in STUDY_CLAIMS.get(study, ()) if len(seeds) >= 2 and a in by_arm and b in by_arm]
        report["studies"][study] = {"rows": [{k: v for k, v in r.items() if k != "key"} for r in rows],
                                    "runs": by_arm, "comparisons": [t.__dict__ for t in tests]}
        plot_study(study, rows, runs, os.path.join(out, f"{study}_val_loss_vs_layer_tokens.png"))
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(results_markdown(report))
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(report, f, indent=1, default=list)
    return report


def results_markdown(report: dict) -> str:
    s = report["settings"]
    head = (f"# Ablations (random-LTD paper, sections 5.1-5.5) at CPU size\n\n"
            f"Tiny GPT {s['num_layers']} layers, hidden {s['hidden_size']}, {s['num_attention_heads']} heads, "
            f"seq {s['seq_length']} bytes, batch {s['batch']}, {s['steps']} steps, seeds {report['seeds']}; "
            f"validation: {s['eval_iters']} batches of {s['batch']} held-out sequences. Train wall time excludes "
            f"evaluation.\n\n")
    parts = []
    for study, v in report["studies"].items():
        parts.append(markdown_table(study, [{**r, "key": None} for r in v["rows"]]))
        tests = v.get("comparisons", [])
        if tests:
            from launch.stats import Comparison

            parts.append("Final val loss differences, Welch's t-test (two-sided) and 95% bootstrap interval over "
                         "seeds:\n\n| difference | mean | 95% CI | Welch t (df) | p | verdict |\n"
                         "|---|---|---|---|---|---|\n" + "\n".join(format_comparison(Comparison(**t)) for t in tests)
                         + "\n")
        elif len(report["seeds"]) < 2:
            parts.append("(one seed: no tests)\n")
    return head + "\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=(*STUDIES, "all"), default="all")
    p.add_argument("--recipe", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    "configs", "tiny_gpt_cpu.json"),
                   help="DeepSpeed JSON config with the random-LTD block (default: configs/tiny_gpt_cpu.json)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1234])
    p.add_argument("--out", default="outputs/ablations")
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's train_batch_size")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--eval-interval", type=int, default=None, help="default: steps // 8")
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--only", nargs="+", default=None, metavar="ARM",
                   help="run only these arms (exact names, as in results.md) of the chosen studies")
    p.add_argument("--special-token-ids", type=int, nargs="*", default=[10],
                   help="ids TokenBypass never drops (default: 10, the newline between verses)")
    a = p.parse_args(argv)
    for name in ("steps", "seq_length", "num_layers", "hidden_size", "num_attention_heads", "eval_iters"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.num_layers < 3:
        p.error("--num-layers must be >= 3 (the layer study needs a first, a middle and a last layer)")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    with open(a.recipe) as f:
        recipe = json.load(f)
    s = Settings(steps=a.steps, batch=a.batch or int(recipe.get("train_batch_size", 16)), seq_length=a.seq_length,
                 num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
                 eval_interval=a.eval_interval or max(1, a.steps // 8), eval_iters=a.eval_iters,
                 special_token_ids=tuple(a.special_token_ids))
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    studies = list(STUDIES) if a.study == "all" else [a.study]
    start = time.perf_counter()
    report = run(studies, recipe, s, a.seeds, a.out, only=a.only)
    print(results_markdown(report))
    print(f"total wall {time.perf_counter() - start:.0f}s; wrote {a.out}/results.md, results.json and the plots")
    return report


if __name__ == "__main__":
    main()
