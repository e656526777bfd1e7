"""SkipLayer on a tiny byte-level LM (the embedded KJV corpus): quality at equal expected compute, step and decode time.

    python benchmarks/skip_layer.py [--device cpu|cuda] [--steps 300] [--layers 4] [--seeds 3] [--no-timing] [--out DIR]

Three parts, one JSON (``results.json``) and one Markdown table (``table.md``) in ``--out``:

1. Quality (paper section 3): arms trained with the same data, steps, optimizer and seed:
   ``dense-L`` (L layers), ``skip-2L-P0.5`` (2L SkipLayers, straight-through Gumbel, P = 0.5, λ = 0.1: the same
   expected layer-tokens as dense-L; Gumbel noise 1 throughout), ``skip-2L-P0.5-anneal`` (the same with the noise
   annealed linearly 1 -> 0 over the first ``--anneal-frac`` of the steps, ``anneal_skip_layers``),
   ``skip-2L-P0.5-noise0`` (no Gumbel noise at all: training decisions are the argmax ones used at eval),
   ``random-2L-P0.5`` (the paper's Rand baseline: router not learned) and ``dense-L/2`` (shallower). Printed, side by
   side: final validation NLL (nats/byte, without the aux loss) under eval's argmax routing and under training-style
   sampled routing (Gumbel noise 1, ``sampled_routing``), the layer-tokens spent in training, and the layers per
   validation token under each routing. ``--seeds N`` trains every arm with seeds ``seed .. seed+N-1`` (model
   initialisation, data order and router noise) and reports mean ± std (sample std, N-1).
2. Step time (forward + backward) of a 2L SkipLayer model, ``efficient`` vs ``dense`` masked implementation, at
   P = 0.125, 0.25, 0.5, 1.0 (router ``random`` with capacity P so that the routed fraction is exactly what is asked).
3. Greedy decode time per token (KV cache, batch 1, random 16-byte prompt) of the trained 2L models vs dense-L, with
   the layers actually run per generated token.
4. ``--decode-width-only``: decode time at width ``--time-hidden`` (untrained; the random router at P = 0.5 makes
   half the layers run per token): dense L vs SkipLayer 2L vs dense 2L, in ``decode_width.{json,md}``.

Timings on a shared CPU are indicative only; the device is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from launch.corpus import VOCAB_SIZE, batch_at, load_corpus  # noqa: E402
from launch.stats import compare, format_comparison, mean_std  # noqa: E402
from random_ltd.layers.skip_layer import (  # noqa: E402
    SkipKVCache,
    SkipLayer,
    SkipLayerOptions,
    TinyDecoder,
    anneal_skip_layers,
    sampled_routing,
    skip_layer_aux_loss,
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(arm: str, args, device) -> TinyDecoder:
    torch.manual_seed(args.seed)  # the seed of this run (main sets args.seed per seed)
    L = args.layers
    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=args.hidden, num_heads=args.heads, max_len=args.seq + args.decode)
    if arm == "dense-L":
        return TinyDecoder(num_layers=L, **kw).to(device)
    if arm == "dense-L/2":
        return TinyDecoder(num_layers=max(1, L // 2), **kw).to(device)
    router = "random" if arm.startswith("random") else "straight_through_gumbel"
    noise = 0.0 if arm.endswith("-noise0") else 1.0  # -noise0: no Gumbel noise, training decisions = argmax
    anneal = max(1, round(args.anneal_frac * args.steps)) if arm.endswith("-anneal") else None
    opts = SkipLayerOptions(capacity=0.5, aux_loss_weight=0.1, router=router, gumbel_noise=noise,
                            anneal_steps=anneal, gumbel_noise_final=0.0)
    return TinyDecoder(num_layers=2 * L, skip=opts, **kw).to(device)


def layer_tokens(model: TinyDecoder, tokens: int) -> float:
    """Layer-tokens of the last forward: tokens per plain layer, routed tokens per SkipLayer."""
    return sum(float(m.last_route.hard.detach().sum()) if isinstance(m, SkipLayer) else tokens for m in model.layers)


def evaluate(model: TinyDecoder, valid: torch.Tensor, args, device, sampled: bool = False) -> tuple[float, float]:
    """Mean validation NLL and layer-tokens per token in eval mode, fixed batches: argmax routing (Algorithm 2), or
    with ``sampled`` training-style Gumbel sampling at noise 1 (seeded, the same draws for every arm)."""
    model.eval()
    nll, lt, n = 0.0, 0.0, 0
    g = torch.Generator(device=device).manual_seed(args.seed + 2)
    with torch.no_grad(), sampled_routing(model, noise=1.0 if sampled else 0.0):
        for i in range(args.val_batches):
            x, y = batch_at(valid, args.seq, args.batch, i, seed=args.seed + 1)
            x, y = x.to(device), y.to(device)
            logits = model(x, generator=g)
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1)))
            lt += layer_tokens(model, x.numel()) / x.numel()
            n += 1
    model.train()
    return nll / n, lt / n


def train_arm(arm: str, train, valid, args, device) -> tuple[dict, TinyDecoder]:
    model = build(arm, args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator(device=device).manual_seed(args.seed)
    spent, start = 0.0, time.perf_counter()
    curve = []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch_at(train, args.seq, args.batch, step, seed=args.seed)
        x, y = x.to(device), y.to(device)
        anneal_skip_layers(model, step)  # no-op for arms without annealing
        logits = model(x, generator=g)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1))
        (loss + skip_layer_aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        spent += layer_tokens(model, x.numel())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, *evaluate(model, valid, args, device)))
    sync(device)
    wall = time.perf_counter() - start
    val, eval_lt = curve[-1][1], curve[-1][2]
    skip = any(isinstance(m, SkipLayer) for m in model.layers)
    sampled_val, sampled_lt = evaluate(model, valid, args, device, sampled=True) if skip else (val, eval_lt)
    caps = {}
    if any(isinstance(m, SkipLayer) for m in model.layers):
        model.eval()
        with torch.no_grad():
            x, _ = batch_at(valid, args.seq, args.batch, 0, seed=args.seed + 1)
            model(x.to(device))
        caps = {i: round(float(m.last_route.hard.mean()), 3) for i, m in enumerate(model.layers)
                if isinstance(m, SkipLayer)}
        model.train()
    row = {"arm": arm, "layers": len(model.layers), "params": sum(p.numel() for p in model.parameters()),
           "seed": args.seed, "val_nll": round(val, 4), "val_nll_sampled": round(sampled_val, 4),
           "train_layer_tokens": int(spent), "eval_layer_tokens_per_token": round(eval_lt, 3),
           "eval_layer_tokens_per_token_sampled": round(sampled_lt, 3),
           "eval_capacities": caps, "wall_s": round(wall, 1), "curve": curve}
    print(f"{arm:>20} seed {args.seed}: val nll argmax {val:.4f} sampled {sampled_val:.4f}  train layer-tokens "
          f"{int(spent):,}  eval layers/token argmax {eval_lt:.2f} sampled {sampled_lt:.2f}  wall {wall:.0f}s  "
          f"eval capacities {caps}", flush=True)
    return row, model


def time_calls(fns: dict, device, repeat: int) -> dict:
    """Best-of-``repeat`` seconds per function, calls interleaved so that load from other jobs hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def step_times(args, device) -> list[dict]:
    rows = []
    for p in (0.125, 0.25, 0.5, 1.0):
        fns = {}
        for impl in ("efficient", "dense"):
            torch.manual_seed(0)
            model = TinyDecoder(vocab_size=VOCAB_SIZE, hidden_size=args.time_hidden, num_heads=args.heads,
                                num_layers=2 * args.layers, max_len=args.time_seq,
                                skip=SkipLayerOptions(capacity=p, router="random", implementation=impl)).to(device)
            x = torch.randint(0, VOCAB_SIZE, (args.batch, args.time_seq), device=device)

            def step(model=model, x=x):
                g = torch.Generator(device=device).manual_seed(1)  # same routing in both implementations
                model(x, generator=g).float().square().mean().backward()

            fns[impl] = step
        best = time_calls(fns, device, args.repeat)
        row = {"P": p, "efficient_ms": round(1000 * best["efficient"], 2), "dense_ms": round(1000 * best["dense"], 2)}
        row["dense_over_efficient"] = round(row["dense_ms"] / row["efficient_ms"], 2)
        print(f"step time P={p:<5}: efficient {row['efficient_ms']:.1f} ms, dense masked {row['dense_ms']:.1f} ms "
              f"(dense/efficient {row['dense_over_efficient']:.2f}x)", flush=True)
        rows.append(row)
    return rows


def decode_times(models: dict, args, device) -> dict:
    """Best-of seconds per generated token (batch 1, KV cache, interleaved) and layers run per generated token."""
    prompt = torch.randint(0, VOCAB_SIZE, (1, 16), device=device)

    def runner(model, count=False):
        def run():
            model.eval()
            cache, x, ran = SkipKVCache(), prompt, 0.0
            with torch.no_grad():
                x = model(x, cache=cache)[:, -1:].argmax(-1)
                for _ in range(args.decode):
                    x = model(x, cache=cache)[:, -1:].argmax(-1)
                    if count:  # not in the timed runs: reading the decisions syncs
                        ran += layer_tokens(model, 1)
            return ran / args.decode
        return run

    layers = {arm: runner(m, count=True)() for arm, m in models.items()}
    fns = {arm: runner(m) for arm, m in models.items()}
    best = time_calls(fns, device, args.repeat)
    return {arm: {"ms_per_token": round(1000 * best[arm] / args.decode, 3), "layers_per_token": round(layers[arm], 2)}
            for arm in fns}


def decode_width(args, device) -> None:
    """Decode time per token at width ``--time-hidden``, untrained: dense L layers vs 2L SkipLayers with the random
    router at P = 0.5 (so half the layers run per token on average) vs dense 2L. Writes decode_width.{json,md}."""
    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=args.time_hidden, num_heads=args.heads, max_len=16 + args.decode + 1)
    torch.manual_seed(0)
    models = {
        "dense-L": TinyDecoder(num_layers=args.layers, **kw),
        "skip-2L-P0.5 (random router)": TinyDecoder(num_layers=2 * args.layers,
                                                    skip=SkipLayerOptions(capacity=0.5, router="random"), **kw),
        "dense-2L": TinyDecoder(num_layers=2 * args.layers, **kw),
    }
    decode = decode_times({k: m.to(device) for k, m in models.items()}, args, device)
    base = decode["dense-L"]["ms_per_token"]
    lines = [f"Device: {device_name(device)} (torch {torch.__version__}). Command: `{' '.join(sys.argv)}`", "",
             f"Greedy decode, batch 1, 16-token prompt, {args.decode} new tokens, d={args.time_hidden}, untrained.", "",
             "| model | decode ms/token | vs dense-L | layers run per token |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['ms_per_token']:.2f} | {v['ms_per_token'] / base:.2f} | {v['layers_per_token']:.2f} |"
              for k, v in decode.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_width.json").write_text(json.dumps({"device": device_name(device), "command": " ".join(
        sys.argv), "hidden": args.time_hidden, "decode": decode}, indent=1) + "\n")
    (args.out / "decode_width.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _aggregate(arm: str, runs: list[dict]) -> dict:
    """One row per arm: means (and sample std) over its seeds."""
    out = {k: runs[0][k] for k in ("arm", "layers", "params")}
    out["seeds"] = [r["seed"] for r in runs]
    for key in ("val_nll", "val_nll_sampled", "eval_layer_tokens_per_token", "eval_layer_tokens_per_token_sampled",
                "wall_s"):
        m, s = mean_std([r[key] for r in runs])
        out[key], out[key + "_std"] = round(m, 4), round(s, 4)
    out["train_layer_tokens"] = round(sum(r["train_layer_tokens"] for r in runs) / len(runs))
    return out


def _comparisons(runs: dict[str, list[dict]]) -> list:
    """The differences the README states: annealing vs constant noise, each SkipLayer arm vs dense-L, and the
    constant-noise arm's argmax-vs-sampled gap (paired by seed, tested as two samples)."""
    vals = {arm: [r["val_nll"] for r in rs] for arm, rs in runs.items()}
    tests = []
    if "skip-2L-P0.5-anneal" in vals and "skip-2L-P0.5" in vals:
        tests.append(compare("skip-2L-P0.5-anneal", vals["skip-2L-P0.5-anneal"], "skip-2L-P0.5", vals["skip-2L-P0.5"]))
    if "skip-2L-P0.5" in runs:
        tests.append(compare("skip-2L-P0.5 argmax", vals["skip-2L-P0.5"], "skip-2L-P0.5 sampled",
                             [r["val_nll_sampled"] for r in runs["skip-2L-P0.5"]]))
    for arm in vals:
        if arm != "dense-L" and "dense-L" in vals:
            tests.append(compare(arm, vals[arm], "dense-L", vals["dense-L"]))
    return tests


def markdown(result: dict) -> str:
    """table.md from results.json's content (quality over seeds, the tests, and the timings when run)."""
    cfg, rows, runs = result["config"], result["quality"], result.get("runs", {})
    n, first = cfg["seeds"], cfg["seed"]
    lines = [f"Device: {result['device']} (torch {result['torch']}). Command: `{result['command']}`", "",
             f"Final validation NLL (nats/byte), mean ± std over {n} seed(s) ({first}..{first + n - 1}); "
             "argmax = eval routing (Algorithm 2), sampled = training-style Gumbel sampling at noise 1. Layers per "
             "validation token under each routing: mean ± std, and per seed.", "",
             "| arm | layers | params | val NLL argmax | val NLL sampled | train layer-tokens | vs dense-L | "
             "eval layers/token argmax | per seed | sampled |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{x['eval_layer_tokens_per_token']:.2f}" for x in runs.get(r["arm"], []))
        lines.append(f"| {r['arm']} | {r['layers']} | {r['params']:,} | {r['val_nll']:.4f} ± {r['val_nll_std']:.4f} | "
                     f"{r['val_nll_sampled']:.4f} ± {r['val_nll_sampled_std']:.4f} | {r['train_layer_tokens']:,} | "
                     f"{r['train_layer_tokens_vs_dense_L']:.3f} | {r['eval_layer_tokens_per_token']:.2f} ± "
                     f"{r['eval_layer_tokens_per_token_std']:.2f} | {per_seed} | "
                     f"{r['eval_layer_tokens_per_token_sampled']:.2f} |")
    tests = result.get("comparisons", [])
    if tests:
        from launch.stats import Comparison

        lines += ["", "Differences of mean val NLL (argmax eval unless marked), Welch t-test (two-sided) and 95% "
                  "percentile bootstrap interval over seeds:", "",
                  "| difference | mean | 95% CI | Welch t (df) | p | verdict |", "|---|---|---|---|---|---|"]
        lines += [format_comparison(Comparison(**t)) for t in tests]
    steps, decode = result.get("step_time", []), result.get("decode", {})
    if steps:
        lines += ["", "| P | efficient step (ms) | dense masked step (ms) | dense / efficient |", "|---|---|---|---|"]
        lines += [f"| {s['P']} | {s['efficient_ms']:.1f} | {s['dense_ms']:.1f} | {s['dense_over_efficient']:.2f} |"
                  for s in steps]
    if decode:
        lines += ["", "| model | decode ms/token | layers run per token |", "|---|---|---|"]
        lines += [f"| {k} | {v['ms_per_token']:.2f} | {v['layers_per_token']:.2f} |" for k, v in decode.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4, help="L: the dense baseline depth (SkipLayer arms use 2L)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--seeds", type=int, default=1, help="train every arm with seeds seed .. seed+N-1")
    ap.add_argument("--anneal-frac", type=float, default=0.75,
                    help="-anneal arm: fraction of the steps over which the Gumbel noise goes 1 -> 0")
    ap.add_argument("--no-timing", action="store_true", help="skip the step-time and decode-time parts")
    ap.add_argument("--arms", default="dense-L,skip-2L-P0.5,skip-2L-P0.5-anneal,skip-2L-P0.5-noise0,random-2L-P0.5,"
                    "dense-L/2")
    ap.add_argument("--time-hidden", type=int, default=256)
    ap.add_argument("--time-seq", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32, help="tokens generated in the decode timing")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "skip_layer_cpu")
    ap.add_argument("--decode-width-only", action="store_true",
                    help="only time decoding at width --time-hidden, untrained (writes decode_width.{json,md})")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.decode_width_only:
        decode_width(args, device)
        return
    train, valid = load_corpus()
    print(f"device: {device_name(device)}; L={args.layers}, d={args.hidden}, seq={args.seq}, batch={args.batch}, "
          f"{args.steps} steps", flush=True)

    if not 0.0 < args.anneal_frac <= 1.0:
        raise SystemExit(f"--anneal-frac must be in (0, 1], got {args.anneal_frac}")
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    arms = args.arms.split(",")
    first_seed, runs, models = args.seed, {arm: [] for arm in arms}, {}
    for seed in range(first_seed, first_seed + args.seeds):
        args.seed = seed
        for arm in arms:
            row, model = train_arm(arm, train, valid, args, device)
            runs[arm].append(row)
            if seed == first_seed:
                models[arm] = model  # the first seed's models are timed below
    args.seed = first_seed
    rows = [_aggregate(arm, runs[arm]) for arm in arms]
    base = next((r for r in rows if r["arm"] == "dense-L"), rows[0])
    for r in rows:
        r["train_layer_tokens_vs_dense_L"] = round(r["train_layer_tokens"] / base["train_layer_tokens"], 3)
    tests = _comparisons(runs) if args.seeds >= 2 else []

    steps, decode = [], {}
    if not args.no_timing:
        steps = step_times(args, device)
        decode = decode_times({arm: m for arm, m in models.items() if arm != "dense-L/2"}, args, device)
    for arm, d in decode.items():
        print(f"decode {arm}: {d['ms_per_token']:.2f} ms/token, {d['layers_per_token']:.2f} layers run per token")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name(device), "torch": torch.__version__, "command": " ".join(sys.argv),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "quality": rows, "runs": runs, "comparisons": [t.__dict__ for t in tests], "step_time": steps,
              "decode": decode}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
