"""HadSkip inference latency vs budget: real skipping vs the masked computation vs the full model.

    python benchmarks/hadskip.py --device cpu --out benchmarks/results/hadskip_cpu/latency.json

A random-init 12-layer BertForSequenceClassification (eager attention) runs a fixed batch; each sequence keeps each
layer with probability s/L (independent draws, fixed seed), i.e. s layers on average, as a trained HadSkip model at
budget s would. Modes are interleaved within each repeat. Prints the median forward time of each mode and the
ratios to the full model; the ideal real-skip ratio is about s/L plus the gate and gather/scatter overhead. No
timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from random_ltd.layers.hadskip import hadskip_layers, set_gating, set_real_skip  # noqa: E402


def build(args: argparse.Namespace):
    import transformers

    from random_ltd.integrations.transformers.hadskip import HadSkipForSequenceClassification

    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                                  max_position_embeddings=args.seq_len, num_labels=2, attn_implementation="eager")
    torch.manual_seed(0)
    model = HadSkipForSequenceClassification(transformers.BertForSequenceClassification(cfg), record_attentions=False)
    return model.to(args.device).eval()


def timed(fn, repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--budgets", type=float, nargs="+", default=[3, 6, 9])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args)
    layers = hadskip_layers(model)
    ids = torch.randint(0, 1000, (args.batch, args.seq_len), device=args.device)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            return model(ids, mask)

    rows = []
    for budget in args.budgets:
        g = torch.Generator().manual_seed(int(budget * 100))
        decisions = (torch.rand(args.batch, args.layers, generator=g) < budget / args.layers).float().to(args.device)
        for i, layer in enumerate(layers):
            layer.gates = (lambda hidden, m=None, i=i, d=decisions: d[:, i].to(hidden.dtype))

        def mode(name: str) -> None:
            set_gating(model, name != "full")
            set_real_skip(model, name == "real_skip")

        # modes interleaved within each repeat, so load drift on a shared machine hits all three alike
        times: dict[str, list[float]] = {"full": [], "real_skip": [], "masked": []}
        for _ in range(args.repeats):
            for name in times:
                mode(name)
                times[name].append(timed(run, 1, args.device))
        mode("real_skip")
        run()
        calls = sum(layer.last_calls for layer in layers)
        full, real, masked = (statistics.median(times[k]) for k in ("full", "real_skip", "masked"))
        rows.append({"budget": budget, "mean_layers": decisions.sum(1).mean().item(), "layer_calls": calls,
                     "full_s": full, "real_skip_s": real, "masked_s": masked, "real_over_full": real / full,
                     "masked_over_full": masked / full, "times": times})
        print(f"budget {budget:g}: mean layers {rows[-1]['mean_layers']:.2f}  full {full * 1e3:.1f} ms  "
              f"real skip {real * 1e3:.1f} ms ({real / full:.2f}x)  masked {masked * 1e3:.1f} ms "
              f"({masked / full:.2f}x)")
    result = {"device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()},"
              f" {args.threads} thread(s))", "torch": torch.__version__,
              "shape": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "seq_len", "batch")}, "rows": rows}
    if args.device == "cuda":
        result["device"] = torch.cuda.get_device_name()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
