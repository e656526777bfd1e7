"""Baseline vs random-LTD on the same data, through the DeepSpeed launcher; prints the savings table and plots.

    python launch/compare.py --nproc 2 --out outputs/tiny_gpt            # the README's main job
    python launch/compare.py --seeds 3 --equal-budget                     # + the equal layer-token budget arm

Arms: ``baseline`` (nothing dropped, iteration LR), ``random-ltd`` (the config's MSLG + LayerToken LR, same steps),
and with ``--equal-budget`` ``random-ltd-budget``: random-LTD trained until it has consumed the baseline's
layer-tokens (the paper's Table 7 form). Every arm sees the same data order and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_arm(name: str, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    out = Path(args.out) / f"{name}_seed{seed}.json"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(args.nproc),
           "--master_port", str(args.master_port), str(ROOT / "launch" / "pretrain_gpt.py"),
           "--deepspeed_config", args.deepspeed_config, "--seed", str(seed), "--results", str(out),
           "--train-iters", str(args.train_iters), "--eval-interval", str(args.eval_interval), *extra,
           *args.passthrough]
    env = dict(os.environ, LOCAL_SIZE=str(args.nproc))  # CPU accelerator: processes per node
    print(f"\n== {name} (seed {seed}): {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    with open(out) as f:
        return json.load(f)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _pct(fraction: float) -> str:
    return f"{round(100 * fraction, 1) + 0.0:.1f}%"  # + 0.0: a rounded -0.0 prints as 0.0


def table(results: dict[str, list[dict]]) -> str:
    base_lt = statistics.mean(r["consumed_layer_tokens"] for r in results["baseline"])
    base_wall = statistics.mean(r["wall_s"] for r in results["baseline"])
    lines = ["| arm | steps | final val loss | layer-tokens | saved vs baseline | wall time (s) | wall saved |",
             "|---|---|---|---|---|---|---|"]
    for arm, runs in results.items():
        lt = statistics.mean(r["consumed_layer_tokens"] for r in runs)
        wall = statistics.mean(r["wall_s"] for r in runs)
        lines.append(f"| {arm} | {runs[0]['steps']} | {mean_std([r['final_val_loss'] for r in runs])} | {lt:,.0f} "
                     f"| {_pct(1 - lt / base_lt)} | {wall:.1f} | {_pct(1 - wall / base_wall)} |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in results.items():
        for i, r in enumerate(runs):
            xs = [p["layer_tokens"] for p in r["curve"]]
            ys = [p["val_loss"] for p in r["curve"]]
            ax.plot(xs, ys, label=arm if i == 0 else None, color={"baseline": "k", "random-ltd": "C0"}.get(arm, "C1"),
                    alpha=0.8)
    ax.set_xlabel("consumed layer-tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("tiny GPT on CPU: baseline vs random-LTD")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", default=str(ROOT / "configs" / "tiny_gpt_cpu.json"))
    p.add_argument("--nproc", type=int, default=2, help="processes per node (data parallel)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--equal-budget", action="store_true", help="add the equal layer-token budget arm")
    p.add_argument("--master-port", type=int, default=29600)
    p.add_argument("--out", default=str(ROOT / "outputs" / "compare"))
    p.add_argument("passthrough", nargs="*", help="extra arguments for launch/pretrain_gpt.py (after --)")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    results: dict[str, list[dict]] = {"baseline": [], "random-ltd": []}
    for seed in range(1234, 1234 + args.seeds):
        base = run_arm("baseline", seed, args, ["--baseline"])
        results["baseline"].append(base)
        results["random-ltd"].append(run_arm("random-ltd", seed, args, []))
        if args.equal_budget:
            # Table 7 form: train until the baseline's layer-tokens are consumed, with LayerToken LR decaying over
            # exactly that budget (Appendix C sets the total to the run's own consumption)
            budget = ["--train-layer-tokens", str(base["consumed_layer_tokens"]),
                      "--lr-total-layer-tokens", str(base["consumed_layer_tokens"]),
                      "--train-iters", str(10 * args.train_iters)]
            results.setdefault("random-ltd-budget", []).append(run_arm("random-ltd-budget", seed, args, budget))

    text = table(results)
    print("\n" + text)
    (Path(args.out) / "table.md").write_text(text + "\n")
    with open(Path(args.out) / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, Path(args.out) / "val_loss_vs_layer_tokens.png")
    print(f"\nwrote {args.out}/table.md, results.json and val_loss_vs_layer_tokens.png")


if __name__ == "__main__":
    main()
