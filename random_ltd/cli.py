"""Command line: ``python -m random_ltd plan|info``.

``plan`` prints the MSLG schedule of a DeepSpeed config, the layer-token budget, the expected saving and the
LayerToken LR next to the iteration LR (``--plot out.png`` draws them). Only ``--config`` is needed: the batch is
the config's ``train_batch_size``, the peak LR ``optimizer.params.lr`` (or the scheduler's ``warmup_max_lr``), the
warmup and length the ``scheduler`` block's ``warmup_num_steps``/``total_num_steps`` (else the MSLG growth length);
flags override. ``info`` lists the op
backends and why any is unavailable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from random_ltd.config import ConfigError, RandomLTDConfig, layer_token_lr_config_from_deepspeed
from random_ltd.schedules import layer_token_lr, plan, planned_lrs

__all__ = ["main"]


def _sample_rows(rows: list, count: int) -> list:
    if len(rows) <= count:
        return rows
    stride = max(1, len(rows) // (count - 1))
    picked = rows[::stride]
    return picked if picked[-1] is rows[-1] else [*picked, rows[-1]]


#: DeepSpeed scheduler types and the decay their iteration LR follows after warmup
_DECAY_OF_SCHEDULER = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


class _PlanInputs:
    """Batch, peak LR, warmup and steps for ``plan``: each flag, else what the DeepSpeed config says.

    ``sources`` says where each value came from (printed), so nothing is silently assumed.
    """

    def __init__(self, args: argparse.Namespace, ds: dict, cfg: RandomLTDConfig) -> None:
        self.sources: dict[str, str] = {}
        scheduler = ds.get("scheduler") if isinstance(ds.get("scheduler"), dict) else {}
        params = scheduler.get("params") if isinstance(scheduler.get("params"), dict) else {}
        opt_params = (ds.get("optimizer") or {}).get("params") or {}
        self.scheduler_type = scheduler.get("type")
        self.batch = self._pick("batch", args.batch, ("train_batch_size", ds.get("train_batch_size")))
        self.lr = self._pick("lr", args.lr, ("scheduler.params.warmup_max_lr", params.get("warmup_max_lr")),
                             ("optimizer.params.lr", opt_params.get("lr")))
        # DeepSpeed's Warmup* schedulers default to a log warmup; without one, a linear warmup is shown
        self.warmup_type = params.get("warmup_type", "log") if self.scheduler_type in _DECAY_OF_SCHEDULER \
            else "linear"
        self.warmup = self._pick("warmup_steps", args.warmup_steps,
                                 ("scheduler.params.warmup_num_steps", params.get("warmup_num_steps")))
        self.warmup_min_lr = params.get("warmup_min_lr", 0.0) if args.warmup_steps is None else 0.0
        growth = cfg.random_ltd_schedule.schedule_config.require_steps
        self.steps = self._pick("steps", args.steps,
                                ("scheduler.params.total_num_steps", params.get("total_num_steps")),
                                ("random_ltd_schedule.schedule_config.require_steps (the growth length)", growth))

    def _pick(self, name: str, flag: Any, *config_values: tuple[str, Any]) -> Any:
        if flag is not None:
            self.sources[name] = "flag"
            return flag
        for where, value in config_values:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.sources[name] = where
                return value
        return None


def _read_config(path: str) -> dict:
    """The DeepSpeed config file as a dict (ConfigError for bad JSON or a non-object)."""
    with open(path, encoding="utf-8") as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object, got {type(ds).__name__}")
    return ds


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        ds = _read_config(args.config)
        cfg = RandomLTDConfig.from_deepspeed(ds)
        lr_cfg = layer_token_lr_config_from_deepspeed(ds)
    except ConfigError as e:
        print(f"invalid config {args.config}:\n{e}", file=sys.stderr)
        return 2
    if not cfg.enabled:
        print(f"random-LTD is not enabled in {args.config} (data_efficiency.data_routing.random_ltd)")
        return 1
    given = _PlanInputs(args, ds, cfg)
    missing = [flag for flag, value in (("--batch (or train_batch_size in the config)", given.batch),
                                        ("--steps (or scheduler.params.total_num_steps / require_steps)",
                                         given.steps)) if value is None]
    if missing:
        print(f"plan needs {' and '.join(missing)}", file=sys.stderr)
        return 2
    steps, batch = int(given.steps), int(given.batch)
    seq = args.seq_len or cfg.random_ltd_schedule.max_value
    rows = plan(cfg, steps, batch, seq)
    consumed = rows[-1].cumulative_layer_tokens if rows else 0
    baseline = rows[-1].cumulative_baseline_layer_tokens if rows else 0
    if args.lr is None and lr_cfg is not None and lr_cfg.lr:
        peak, given.sources["lr"] = lr_cfg.lr, "the LayerToken LR block's lr"
    elif given.lr is not None:
        peak = float(given.lr)
    else:
        peak, given.sources["lr"] = 1.0, "none given: LRs shown relative to a peak of 1.0"
    warmup = int(given.warmup or 0)
    decay = lr_cfg.decay_type if lr_cfg is not None else _DECAY_OF_SCHEDULER.get(given.scheduler_type, "constant")
    min_lr = lr_cfg.min_lr if lr_cfg is not None else 0.0

    def iteration_lr(step: int) -> float:
        # The iteration schedule (the one LayerToken LR replaces): linear warmup, then the decay over steps.
        if step < warmup:
            low = given.warmup_min_lr
            if given.warmup_type == "log":
                return low + (peak - low) * math.log(step + 1) / math.log(warmup) if warmup > 1 else peak
            return low + (peak - low) * step / warmup
        if decay == "constant":
            return peak
        total = max(steps, 1)
        return layer_token_lr(step, lr=peak, total_layer_tokens=total, warmup_layer_tokens=min(warmup, total),
                              warmup_type="linear", decay_type=decay, min_lr=min_lr)

    lt_lrs = None if lr_cfg is None else planned_lrs(rows, lr_cfg, peak)

    print(f"random-LTD plan for {args.config}: L={cfg.total_layer_num}, layers {list(cfg.layer_ids)}, "
          f"seq {seq}, batch {batch}, {steps} steps, schedule {cfg.random_ltd_schedule.schedule_type}")
    print("inputs: " + ", ".join(f"{name} from {where}" for name, where in given.sources.items()))
    print(f"{'step':>8} {'kept':>6} {'layer-tokens':>14} {'cumulative':>16} {'baseline cum.':>16} "
          f"{'LayerToken LR':>14} {'iteration LR':>13}")
    for r in _sample_rows(rows, args.rows):
        lt = None if lt_lrs is None else lt_lrs[r.step]
        print(f"{r.step:>8} {r.kept:>6} {r.layer_tokens:>14,} {r.cumulative_layer_tokens:>16,} "
              f"{r.cumulative_baseline_layer_tokens:>16,} {'-' if lt is None else f'{lt:.3e}':>14} "
              f"{iteration_lr(r.step):>13.3e}")
    saved = 0.0 if baseline == 0 else 100 * (1 - consumed / baseline)
    n, L = len(cfg.layer_ids), cfg.total_layer_num
    full = len(rows) * batch * seq * (L - n)  # the layers that never drop
    dropping = 0.0 if baseline == full else 100 * (1 - (consumed - full) / (baseline - full))
    print(f"total layer-tokens: {consumed:,} (baseline {baseline:,}): {saved:.1f}% saved over the whole network "
          f"(all {L} layers, the {L - n} full ones included)")
    print(f"{dropping:.1f}% saved in the {n} dropping layers alone (the paper's GPT '1/3' is this figure: the whole "
          f"network saves {n}/{L} of it; its BERT 31.1%/26.2% are whole-network figures)")
    print(f"note: training counts the layer-tokens that really ran (each batch's real size and length); this plan "
          f"assumes {batch} x {seq} tokens every step. DeepSpeed's own random-LTD counts train_batch_size x "
          f"max_value whatever the data loader gives.")
    print(f"note: dropped tokens are drawn from data_efficiency.seed {cfg.seed} (not the global RNG: --seed does not "
          f"change them); parent enabled flags are honoured; unknown keys are refused.")
    if lr_cfg is not None and lr_cfg.total_layer_tokens != consumed:
        print(f"note: layer_token_lr total_layer_tokens {lr_cfg.total_layer_tokens:,} != planned consumption "
              f"{consumed:,} (Appendix C sets it to the run's own consumption)")
    if args.plot:
        _plot(args.plot, rows, lt_lrs, iteration_lr)
        print(f"wrote {args.plot}")
    return 0


def _plot(path, rows, lt_lrs, iteration_lr) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, [r.kept for r in rows])
    a.set_xlabel("step")
    a.set_ylabel("kept tokens (MSLG)")
    if lt_lrs is not None:
        b.plot(steps, [lt_lrs[s] for s in steps], label="LayerToken LR")
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
    pp.add_argument("--steps", type=int, default=None,
                    help="optimizer steps of the run (default: scheduler.params.total_num_steps, else the MSLG "
                         "growth length require_steps)")
    pp.add_argument("--batch", type=int, default=None,
                    help="global batch size, samples per step (default: the config's train_batch_size)")
    pp.add_argument("--seq-len", type=int, default=None, help="sequence length (default: max_value)")
    pp.add_argument("--warmup-steps", type=int, default=None,
                    help="warmup of the iteration LR to compare with (default: scheduler.params.warmup_num_steps)")
    pp.add_argument("--lr", type=float, default=None,
                    help="peak LR (default: optimizer.params.lr, else the LayerTokenLR block's lr, else 1.0)")
    pp.add_argument("--rows", type=int, default=12, help="rows of the printed table")
    pp.add_argument("--plot", default=None, help="write a PNG of the kept length and both LR curves")
    pp.set_defaults(func=cmd_plan)
    pi = sub.add_parser("info", help="list op backends and why any is unavailable")
    pi.set_defaults(func=cmd_info)
    args = p.parse_args(argv)
    return args.func(args)
