"""Command line: ``python -m random_ltd plan|info``.

``plan`` prints the MSLG schedule of a DeepSpeed config, the layer-token budget, the expected saving and the
LayerToken LR next to the iteration LR (``--plot out.png`` draws them). ``info`` lists the op backends and why any
is unavailable.
"""

from __future__ import annotations

import argparse
import sys

from random_ltd.config import ConfigError, RandomLTDConfig, layer_token_lr_config_from_deepspeed
from random_ltd.schedules import layer_token_lr, plan

__all__ = ["main"]


def _sample_rows(rows: list, count: int) -> list:
    if len(rows) <= count:
        return rows
    stride = max(1, len(rows) // (count - 1))
    picked = rows[::stride]
    return picked if picked[-1] is rows[-1] else [*picked, rows[-1]]


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        cfg = RandomLTDConfig.from_deepspeed(args.config)
        lr_cfg = layer_token_lr_config_from_deepspeed(args.config)
    except ConfigError as e:
        print(f"invalid config {args.config}:\n{e}", file=sys.stderr)
        return 2
    if not cfg.enabled:
        print(f"random-LTD is not enabled in {args.config} (data_efficiency.data_routing.random_ltd)")
        return 1
    seq = args.seq_len or cfg.random_ltd_schedule.max_value
    rows = plan(cfg, args.steps, args.batch, seq)
    consumed = rows[-1].cumulative_layer_tokens if rows else 0
    baseline = rows[-1].cumulative_baseline_layer_tokens if rows else 0
    peak = args.lr if args.lr is not None else (lr_cfg.lr if lr_cfg is not None and lr_cfg.lr else 1.0)
    warmup = args.warmup_steps

    def iteration_lr(step: int) -> float:
        # The iteration schedule LayerToken LR replaces: linear warmup, then the same decay over steps.
        if lr_cfg is None:
            return peak
        total = max(args.steps, 1)
        return layer_token_lr(step, lr=peak, total_layer_tokens=total, warmup_layer_tokens=min(warmup, total),
                              warmup_type="linear", decay_type=lr_cfg.decay_type, min_lr=lr_cfg.min_lr)

    def lt_lr(cum_before: int) -> float | None:
        if lr_cfg is None:
            return None
        return layer_token_lr(cum_before, lr=peak, total_layer_tokens=lr_cfg.total_layer_tokens,
                              warmup_layer_tokens=lr_cfg.warmup_layer_tokens, warmup_type=lr_cfg.warmup_type,
                              decay_type=lr_cfg.decay_type, min_lr=lr_cfg.min_lr)

    print(f"random-LTD plan for {args.config}: L={cfg.total_layer_num}, layers {list(cfg.layer_ids)}, "
          f"seq {seq}, batch {args.batch}, {args.steps} steps, schedule {cfg.random_ltd_schedule.schedule_type}")
    print(f"{'step':>8} {'kept':>6} {'layer-tokens':>14} {'cumulative':>16} {'baseline cum.':>16} "
          f"{'LayerToken LR':>14} {'iteration LR':>13}")
    before = [0] + [r.cumulative_layer_tokens for r in rows]
    for r in _sample_rows(rows, args.rows):
        lt = lt_lr(before[r.step])
        print(f"{r.step:>8} {r.kept:>6} {r.layer_tokens:>14,} {r.cumulative_layer_tokens:>16,} "
              f"{r.cumulative_baseline_layer_tokens:>16,} {'-' if lt is None else f'{lt:.3e}':>14} "
              f"{iteration_lr(r.step):>13.3e}")
    saved = 0.0 if baseline == 0 else 100 * (1 - consumed / baseline)
    n, L = len(cfg.layer_ids), cfg.total_layer_num
    full = len(rows) * args.batch * seq * (L - n)  # the layers that never drop
    dropping = 0.0 if baseline == full else 100 * (1 - (consumed - full) / (baseline - full))
    print(f"total layer-tokens: {consumed:,} (baseline {baseline:,}): {saved:.1f}% saved over the whole network "
          f"(all {L} layers, the {L - n} full ones included)")
    print(f"{dropping:.1f}% saved in the {n} dropping layers alone (the paper's GPT '1/3' is this figure: the whole "
          f"network saves {n}/{L} of it; its BERT 31.1%/26.2% are whole-network figures)")
    if lr_cfg is not None and lr_cfg.total_layer_tokens != consumed:
        print(f"note: layer_token_lr total_layer_tokens {lr_cfg.total_layer_tokens:,} != planned consumption "
              f"{consumed:,} (Appendix C sets it to the run's own consumption)")
    if args.plot:
        _plot(args.plot, rows, before, lt_lr, iteration_lr)
        print(f"wrote {args.plot}")
    return 0


def _plot(path, rows, before, lt_lr, iteration_lr) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, [r.kept for r in rows])
    a.set_xlabel("step")
    a.set_ylabel("kept tokens (MSLG)")
    if lt_lr(0) is not None:
        b.plot(steps, [lt_lr(before[s]) for s in steps], label="LayerToken LR")
    b.plot(steps, [iteration_lr(s) for s in steps], label="iteration LR", linestyle="--")
    b.set_xlabel("step")
    b.set_ylabel("learning rate")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cmd_info(args: argparse.Namespace) -> int:
    from random_ltd.info import report

    print(report())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m random_ltd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("plan", help="print the schedule, budget and LR curves of a DeepSpeed config")
    pp.add_argument("--config", required=True, help="DeepSpeed JSON config with the random-LTD block")
    pp.add_argument("--steps", type=int, required=True, help="optimizer steps of the run")
    pp.add_argument("--batch", type=int, required=True, help="global batch size (samples per step)")
    pp.add_argument("--seq-len", type=int, default=None, help="sequence length (default: max_value)")
    pp.add_argument("--warmup-steps", type=int, default=0, help="warmup of the iteration LR to compare with")
    pp.add_argument("--lr", type=float, default=None, help="peak LR (default: the config's, else 1.0)")
    pp.add_argument("--rows", type=int, default=12, help="rows of the printed table")
    pp.add_argument("--plot", default=None, help="write a PNG of the kept length and both LR curves")
    pp.set_defaults(func=cmd_plan)
    pi = sub.add_parser("info", help="list op backends and why any is unavailable")
    pi.set_defaults(func=cmd_info)
    args = p.parse_args(argv)
    return args.func(args)
