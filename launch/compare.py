"""Baseline vs random-LTD on the same data, through the DeepSpeed launcher; prints the table, the tests and plots.

    python launch/compare.py --nproc 2 --out outputs/tiny_gpt                  # make demo: baseline, random-ltd
    python launch/compare.py --design paper --seeds 3 --lr-grid 1e-3,2e-3,4e-3 --out DIR   # the fair comparison

Arms (``--arms``, or ``--design paper`` for all of them):

``baseline``            nothing dropped, the config's iteration schedule (WarmupDecayLR) over its length.
``random-ltd``          the recipe: MSLG + LayerToken LR, the same steps as the baseline (about 2/3 of its
                        layer-tokens for the tiny recipe).
``random-ltd-budget``   random-LTD at the baseline's layer-token budget (``--equal-budget`` adds it).
``random-ltd-2/3``      random-LTD at 2/3 of the baseline's layer-tokens: the paper's Table 7 headline, compared
                        with the full baseline.
``baseline-1.5x``       the baseline at 1.5x its layer-tokens, compared with ``random-ltd-budget`` (Table 7's
                        other pairs: random-LTD at X vs the baseline at 1.5X).
``baseline-ltd-lr``     the schedule control: nothing dropped, but every step at the LR ``random-ltd`` has at that
                        step (its LayerToken LR, replayed with ``--lr-schedule-of``; not swept: it takes
                        ``random-ltd``'s pick). ``random-ltd`` minus it is the effect of the dropping alone at an
                        identical LR curve; it minus ``baseline`` is the effect of the schedule alone.

Fairness (issue 15): every budget arm is planned, not stopped early: its step count is the one whose planned
consumption matches the budget, with the MSLG growth (``require_steps``) rescaled to the arm's own length (the same
fraction of training as in the recipe) and LayerToken LR decaying over exactly that consumption (Appendix C eq. 2),
warmup per eq. 1 (``s * L * B * warmup_steps``); a baseline arm's WarmupDecayLR spans its own length. With
``--lr-grid`` (and ``--warmup-grid``) every arm first trains once per (peak LR, warmup) with ``--sweep-seed`` (not one
of the reported seeds) and is then reported at its own best value, so no arm wins by a better-suited LR. Dropout is
the paper's 0.1 (``--dropout``). With ``--seeds N >= 2`` each claimed difference gets Welch's t-test and a 95%
bootstrap interval over the per-seed final validation losses (``launch/stats.py``), printed under the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launch.stats import compare, format_comparison, mean_std  # noqa: E402

RLTD = ("data_efficiency", "data_routing", "random_ltd")
# arm -> (dropping, budget as a multiple of the baseline's layer-tokens; None = the baseline's steps)
ARMS: dict[str, tuple[bool, float | None]] = {
    "baseline": (False, None),
    "random-ltd": (True, None),
    "random-ltd-budget": (True, 1.0),
    "random-ltd-2/3": (True, 2.0 / 3.0),
    "baseline-1.5x": (False, 1.5),
    "baseline-ltd-lr": (False, None),
}
# arm -> the arm whose per-step LR it replays (and whose steps, peak LR and warmup it takes)
LR_OF = {"baseline-ltd-lr": "random-ltd"}
PAPER_ARMS = ("baseline", "random-ltd", "random-ltd-budget", "random-ltd-2/3", "baseline-1.5x", "baseline-ltd-lr")
# the differences the README may claim: (a, b) tested as mean(a) - mean(b) of final validation loss
CLAIMS = (("random-ltd", "baseline"), ("random-ltd-budget", "baseline"), ("random-ltd-2/3", "baseline"),
          ("random-ltd-budget", "baseline-1.5x"), ("random-ltd", "baseline-ltd-lr"), ("baseline-ltd-lr", "baseline"))


def _block(ds: dict) -> dict:
    d = ds
    for k in RLTD:
        d = d.setdefault(k, {})
    return d


def _sched_params(ds: dict) -> dict:
    """The iteration scheduler's params (a detached empty dict when the config has no scheduler block)."""
    sched = ds.get("scheduler")
    return sched.setdefault("params", {}) if isinstance(sched, dict) else {}


class Planner:
    """Arm configs of one recipe: lengths for budgets, rescaled MSLG, LayerToken LR totals (all planned, exact)."""

    def __init__(self, recipe: dict, *, train_iters: int, seq_len: int, num_layers: int) -> None:
        from random_ltd.config import RandomLTDConfig

        self.recipe = copy.deepcopy(recipe)
        self.train_iters = train_iters
        self.seq_len = seq_len
        self.num_layers = num_layers
        self.batch = int(recipe["train_batch_size"])
        block = _block(self.recipe)
        block.setdefault("total_layer_num", num_layers)
        block.setdefault("random_ltd_schedule", {}).setdefault("max_value", seq_len)
        cfg = RandomLTDConfig.from_deepspeed(self.recipe)
        sched = cfg.random_ltd_schedule
        recipe_len = int(_sched_params(self.recipe).get("total_num_steps", train_iters))
        if sched.schedule_type == "fixed_linear":
            self.growth_fraction = sched.schedule_config.require_steps / recipe_len  # e.g. 170 / 200
        elif sched.schedule_type == "fixed_linear_tokens":
            self.growth_fraction = sched.schedule_config.require_tokens / (recipe_len * self.batch * seq_len)
        else:
            self.growth_fraction = None  # constant: nothing to rescale
        self.baseline_per_step = self.batch * seq_len * num_layers

    def config(self, dropping: bool, steps: int, lr: float | None = None, warmup: int | None = None) -> dict:
        """The DeepSpeed config of one run of ``steps`` steps (random-LTD's growth rescaled to ``steps``)."""
        from random_ltd.config import RandomLTDConfig
        from random_ltd.schedules import random_ltd_budget

        ds = copy.deepcopy(self.recipe)
        params = _sched_params(ds)
        if lr is not None:
            ds.setdefault("optimizer", {}).setdefault("params", {})["lr"] = lr
            params["warmup_max_lr"] = lr
        if warmup is not None:
            params["warmup_num_steps"] = warmup
        params["total_num_steps"] = steps
        block = _block(ds)
        lr_block = block.setdefault("layer_token_lr_schedule", {})
        if not dropping:
            block["enabled"] = False
            lr_block["enabled"] = False
            return ds
        growth = block["random_ltd_schedule"].setdefault("schedule_config", {})
        stype = block["random_ltd_schedule"].get("schedule_type", "fixed_linear")
        if stype == "fixed_linear":
            growth["require_steps"] = max(1, round(self.growth_fraction * steps))
        elif stype == "fixed_linear_tokens":
            growth["require_tokens"] = max(1, round(self.growth_fraction * steps * self.batch * self.seq_len))
        budget = random_ltd_budget(RandomLTDConfig.from_deepspeed(ds), warmup_steps=int(params.get(
            "warmup_num_steps", 0)), total_steps=steps, batch_size=self.batch, seq_len=self.seq_len)
        lr_block.update(enabled=True, warmup_type="linear", total_layer_tokens=budget.total_layer_tokens,
                        warmup_layer_tokens=min(budget.warmup_layer_tokens, budget.total_layer_tokens))
        lr_block.setdefault("decay_type", "linear")
        return ds

    def planned(self, ds: dict, steps: int) -> int:
        """Planned layer-tokens of ``steps`` steps of ``ds`` (the baseline: every layer sees every token)."""
        from random_ltd.config import RandomLTDConfig
        from random_ltd.schedules import planned_layer_tokens

        if not _block(ds).get("enabled", False):
            return steps * self.baseline_per_step
        return planned_layer_tokens(RandomLTDConfig.from_deepspeed(ds), steps, self.batch, self.seq_len)[0]

    def steps_for(self, dropping: bool, budget: float | None) -> int:
        """Steps of an arm: the baseline's for ``budget`` None, else the length whose plan is closest to
        ``budget x`` the baseline's layer-tokens (random-LTD's growth rescaled to each candidate length)."""
        if budget is None:
            return self.train_iters
        target = budget * self.train_iters * self.baseline_per_step
        if not dropping:
            return max(1, round(target / self.baseline_per_step))
        best, best_err = 1, float("inf")
        lo = max(1, int(target // self.baseline_per_step))  # dropping never uses more than the baseline per step
        for steps in range(lo, 10 * lo + 10):
            consumed = self.planned(self.config(True, steps), steps)
            if abs(consumed - target) < best_err:
                best, best_err = steps, abs(consumed - target)
            if consumed > target:
                break
        return best


def run_arm(name: str, seed: int, ds: dict, steps: int, args: argparse.Namespace, tag: str = "",
            lr_source: dict | None = None) -> dict:
    """One run through the DeepSpeed launcher; returns launch/megatron_train.py's result JSON. ``lr_source``: a
    random-LTD config whose per-step LR this (baseline) run replays (``--lr-schedule-of``)."""
    safe = name.replace("/", "_") + tag
    cfg_path = Path(args.out) / "configs" / f"{safe}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(ds, indent=1) + "\n")
    out = Path(args.out) / f"{safe}_seed{seed}.json"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    extra = ["--baseline"] if not _block(ds).get("enabled", False) else []
    if lr_source is not None:
        source_path = cfg_path.with_suffix(".lr_source.json")
        source_path.write_text(json.dumps(lr_source, indent=1) + "\n")
        extra += ["--lr-schedule-of", str(source_path)]
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(args.nproc),
           "--master_port", str(args.master_port), str(ROOT / "launch" / "pretrain_gpt.py"),
           "--deepspeed_config", str(cfg_path), "--seed", str(seed), "--results", str(out),
           "--train-iters", str(steps), "--eval-interval", str(args.eval_interval),
           "--seq-length", str(args.seq_length), "--num-layers", str(args.num_layers),
           "--hidden-dropout", str(args.dropout), "--attention-dropout", str(args.dropout), *extra,
           *args.passthrough]
    env = dict(os.environ, LOCAL_SIZE=str(args.nproc))  # CPU accelerator: processes per node
    # what makes a run: its command (paths, seed, steps, flags) and its config; --resume reuses only an exact match
    made = {"cmd": cmd[1:], "config": ds} | ({} if lr_source is None else {"lr_source": lr_source})
    key = json.dumps(made, sort_keys=True)
    stamp = out.with_suffix(".run.json")
    if getattr(args, "resume", False) and out.exists() and stamp.exists() and stamp.read_text() == key:
        print(f"\n== {name}{tag} (seed {seed}, {steps} steps): reusing {out} (--resume, same command and config)",
              flush=True)
    else:
        stamp.unlink(missing_ok=True)
        print(f"\n== {name}{tag} (seed {seed}, {steps} steps): {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, env=env, check=True, cwd=ROOT)
        stamp.write_text(key)
    with open(out) as f:
        result = json.load(f)
    result["arm"] = name
    return result


def _g(value: float | None) -> str:
    """A swept LR as printed and as named in result files ('config': the config's own LR)."""
    return "config" if value is None else f"{value:g}"


def _pct(fraction: float) -> str:
    return f"{round(100 * fraction, 1) + 0.0:.1f}%"  # + 0.0: a rounded -0.0 prints as 0.0


def _fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.4f}" if len(values) == 1 else f"{m:.4f} ± {s:.4f}"


def table(results: dict[str, list[dict]], settings: dict[str, dict]) -> str:
    """Markdown table: one row per arm, mean ± std (sample std) over its seeds."""
    base_lt = statistics.mean(r["consumed_layer_tokens"] for r in results["baseline"])
    base_wall = statistics.mean(r["wall_s"] for r in results["baseline"])
    lines = ["| arm | steps | peak LR / warmup | final val loss | layer-tokens | vs baseline | wall time (s) | "
             "wall saved |", "|---|---|---|---|---|---|---|---|"]
    for arm, runs in results.items():
        lt = statistics.mean(r["consumed_layer_tokens"] for r in runs)
        wall = statistics.mean(r["wall_s"] for r in runs)
        s = settings.get(arm, {})
        lr = f"{_g(s.get('lr'))} / {s.get('warmup', 'config')}"
        if arm in LR_OF:
            lr += f" ({LR_OF[arm]}'s LR per step)"
        lines.append(f"| {arm} | {runs[0]['steps']} | {lr} | {_fmt([r['final_val_loss'] for r in runs])} | "
                     f"{lt:,.0f} | {lt / base_lt:.3f}x | {wall:.1f} | {_pct(1 - wall / base_wall)} |")
    return "\n".join(lines)


def tests_table(results: dict[str, list[dict]]) -> tuple[str, list[dict]]:
    """Welch t / bootstrap rows for the claimed differences whose two arms both ran with >= 2 seeds."""
    rows, out = [], []
    for a, b in CLAIMS:
        if a in results and b in results and len(results[a]) >= 2 and len(results[b]) >= 2:
            c = compare(a, [r["final_val_loss"] for r in results[a]], b, [r["final_val_loss"] for r in results[b]])
            rows.append(format_comparison(c))
            out.append(c.__dict__)
    if not rows:
        return "(fewer than 2 seeds: no tests)", out
    head = ["Final validation loss differences (negative = first arm better); Welch's t-test, two-sided, and 95% "
            "percentile bootstrap interval over seeds:", "", "| difference | mean | 95% CI | Welch t (df) | p | "
            "verdict |", "|---|---|---|---|---|---|"]
    return "\n".join(head + rows), out


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for j, (arm, runs) in enumerate(results.items()):
        for i, r in enumerate(runs):
            xs = [p["layer_tokens"] for p in r["curve"]]
            ys = [p["val_loss"] for p in r["curve"]]
            ax.plot(xs, ys, label=arm if i == 0 else None, color=f"C{j}", alpha=0.8)
    ax.set_xlabel("consumed layer-tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("tiny GPT on CPU: baseline vs random-LTD")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _grid(text: str | None, cast: Callable[[str], float | int]) -> list:
    if not text:
        return [None]
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"expected a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise SystemExit(f"empty grid {text!r}")
    return values


def sweep_arm(trial: Callable[[float | None, int | None], dict], lrs: list, warmups: list, mode: str,
              config_warmup: int) -> list[dict]:
    """The sweep trials of one arm (none when there is one setting). ``grid``: every (LR, warmup) pair.
    ``coordinate``: every LR at the config's warmup, then every other warmup at the best of those LRs: |LR| + |W| - 1
    runs instead of |LR| x |W|, the cheaper design that assumes the two optima barely interact."""
    if len(lrs) * len(warmups) == 1:
        return []
    if mode == "grid" or warmups == [None]:  # the config's own warmup runs (and is named) as in the LR phase
        return [trial(lr, None if w == config_warmup else w) for lr in lrs for w in warmups]
    trials = [trial(lr, None) for lr in lrs]
    best_lr = min(trials, key=lambda t: t["final_val_loss"])["lr"]
    trials += [trial(best_lr, w) for w in warmups if w is not None and w != config_warmup]
    return trials


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", default=str(ROOT / "configs" / "tiny_gpt_cpu.json"))
    p.add_argument("--nproc", type=int, default=2, help="processes per node (data parallel)")
    p.add_argument("--seeds", type=int, default=1, help="reported seeds 1234 .. 1234+N-1")
    p.add_argument("--train-iters", type=int, default=200, help="the baseline's steps")
    p.add_argument("--seq-length", type=int, default=None, help="default: the config's random_ltd max_value")
    p.add_argument("--num-layers", type=int, default=None, help="default: the config's total_layer_num")
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--arms", default="baseline,random-ltd", help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--design", choices=["paper"], default=None, help="'paper': every arm (overrides --arms)")
    p.add_argument("--equal-budget", action="store_true", help="add the random-ltd-budget arm")
    p.add_argument("--lr-grid", default=None, help="peak LRs to sweep per arm (comma list, >= 3 for a sweep)")
    p.add_argument("--warmup-grid", default=None, help="warmup steps to sweep per arm (comma list)")
    p.add_argument("--sweep", choices=["grid", "coordinate"], default="grid",
                   help="grid: every (LR, warmup) pair; coordinate: LRs at the config's warmup, then warmups at the "
                        "best LR (|LR| + |W| - 1 runs per arm)")
    p.add_argument("--sweep-seed", type=int, default=999, help="seed of the sweep runs (not a reported seed)")
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout (paper: 0.1)")
    p.add_argument("--master-port", type=int, default=29600)
    p.add_argument("--out", default=str(ROOT / "outputs" / "compare"))
    p.add_argument("--resume", action="store_true",
                   help="reuse a run's result in --out when it was made by the same command and config "
                        "(each reuse is printed); otherwise every run is made afresh")
    p.add_argument("passthrough", nargs="*", help="extra arguments for launch/pretrain_gpt.py (after --)")
    args = p.parse_args(argv)
    arms = list(PAPER_ARMS) if args.design == "paper" else [a for a in args.arms.split(",") if a]
    if args.equal_budget and "random-ltd-budget" not in arms:
        arms.append("random-ltd-budget")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "baseline" not in arms:
        raise SystemExit(f"--arms: unknown {unknown}; allowed {list(ARMS)}, and 'baseline' is required")
    for arm, source in LR_OF.items():
        if arm in arms and source not in arms:
            raise SystemExit(f"--arms: {arm} replays {source}'s LR schedule; add {source}")
    args.arm_list = arms
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    return args


def main(argv: list[str] | None = None, runner: Callable[..., dict] = run_arm) -> dict:
    """Plan every arm, sweep LR/warmup when asked, run the seeds, write table.md, results.json and the plot."""
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(args.deepspeed_config) as f:
        recipe = json.load(f)
    block = _block(copy.deepcopy(recipe))
    for name, key, value in (("--num-layers", "total_layer_num", args.num_layers),
                             ("--seq-length", "max_value", args.seq_length)):
        given = block.get(key) if key == "total_layer_num" else block.get("random_ltd_schedule", {}).get(key)
        if value is None and given is None:
            raise SystemExit(f"{name}: the config has no {key}; pass {name}")
        if value is not None and given is not None and value != given:
            raise SystemExit(f"{name} {value} != the config's {key} {given} (the plan would not match the run)")
    args.num_layers = args.num_layers or block["total_layer_num"]
    args.seq_length = args.seq_length or block["random_ltd_schedule"]["max_value"]
    planner = Planner(recipe, train_iters=args.train_iters, seq_len=args.seq_length, num_layers=args.num_layers)
    lrs, warmups = _grid(args.lr_grid, float), _grid(args.warmup_grid, int)
    if args.warmup_grid and not isinstance(recipe.get("scheduler"), dict):
        raise SystemExit("--warmup-grid: the config has no 'scheduler' block whose warmup_num_steps it would set")
    config_warmup = int(_sched_params(recipe).get("warmup_num_steps", 0))

    settings: dict[str, dict] = {}
    sweep: dict[str, list[dict]] = {}
    for arm in sorted(args.arm_list, key=lambda a: a in LR_OF):  # an LR source is settled before its replays
        if arm in LR_OF:
            settings[arm] = dict(settings[LR_OF[arm]])
            continue
        dropping, budget = ARMS[arm]
        steps = planner.steps_for(dropping, budget)

        def trial(lr: float | None, w: int | None, arm: str = arm, dropping: bool = dropping,
                  steps: int = steps) -> dict:
            r = runner(arm, args.sweep_seed, planner.config(dropping, steps, lr, w), steps, args,
                       tag=f"_lr{_g(lr)}_w{w}")
            return {"lr": lr, "warmup": config_warmup if w is None else w, "final_val_loss": r["final_val_loss"]}

        trials = sweep_arm(trial, lrs, warmups, args.sweep, config_warmup)
        best = {"lr": lrs[0], "warmup": warmups[0], "steps": steps}
        if trials:
            sweep[arm] = trials
            pick = min(trials, key=lambda t: t["final_val_loss"])
            best.update(lr=pick["lr"], warmup=pick["warmup"])
        if best["warmup"] is None:
            best["warmup"] = config_warmup
        settings[arm] = best

    results: dict[str, list[dict]] = {arm: [] for arm in args.arm_list}
    for seed in range(1234, 1234 + args.seeds):
        for arm in args.arm_list:
            dropping, _ = ARMS[arm]
            s = settings[arm]
            replay = {} if arm not in LR_OF else {"lr_source": planner.config(True, s["steps"], s["lr"], s["warmup"])}
            results[arm].append(runner(arm, seed, planner.config(dropping, s["steps"], s["lr"], s["warmup"]),
                                       s["steps"], args, **replay))

    text = table(results, settings)
    tests, comparisons = tests_table(results)
    sweep_text = ""
    if sweep:
        sweep_text = f"\n\nLR/warmup sweep (seed {args.sweep_seed}), final val loss per arm:\n\n" + "\n".join(
            f"- {arm}: " + ", ".join(f"lr {_g(t['lr'])} w {t['warmup']}: {t['final_val_loss']:.4f}" for t in trials)
            for arm, trials in sweep.items())
    report = f"{text}\n\n{tests}{sweep_text}\n"
    print("\n" + report)
    (Path(args.out) / "table.md").write_text(report)
    summary = {"arms": args.arm_list, "settings": settings, "sweep": sweep, "comparisons": comparisons,
               "dropout": args.dropout, "results": results}
    with open(Path(args.out) / "results.json", "w") as f:
        json.dump(summary, f, indent=1)
    if runner is run_arm:
        plot(results, Path(args.out) / "val_loss_vs_layer_tokens.png")
    print(f"\nwrote {args.out}/table.md and results.json")
    return summary


if __name__ == "__main__":
    main()
