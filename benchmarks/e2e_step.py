"""Training-step time of a megatron-core GPT with random-LTD at several keep ratios, beside the LayerToken saving.

    python benchmarks/e2e_step.py                         # CPU shape (small)
    python benchmarks/e2e_step.py --device cuda --num-layers 24 --hidden-size 1024 --seq-length 2048

For each keep ratio k/s of the middle layers (first and last layers full) it times forward + backward + optimizer
step and prints the realized saving ``1 - t(k)/t(s)`` next to the theoretical LayerToken saving
``1 - (2s + (L-2)k) / (Ls)``, and their ratio (the goal on GPU is >= 0.9; attention is quadratic in k, so the
realized saving can also exceed the linear LayerToken one). Results go to ``--out`` as JSON with the device named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _init(device: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    import random_ltd.integrations.megatron  # noqa: F401 - CPU shim when CUDA is absent

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--ratios", default="0.0625,0.25,0.5,1.0")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    _init(args.device)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from random_ltd import RandomLTDConfig
    from random_ltd.integrations.megatron import gpt_layer_specs
    from random_ltd.layers import convert_to_random_ltd

    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    L, s, b = args.num_layers, args.seq_length, args.micro_batch_size
    cfg = TransformerConfig(num_layers=L, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
                            use_cpu_initialization=args.device == "cpu", hidden_dropout=0.0, attention_dropout=0.0,
                            bf16=dtype == "bf16", params_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model = GPTModel(cfg, gpt_layer_specs(L), vocab_size=256, max_sequence_length=s,
                     position_embedding_type="rope").to(args.device).train()
    state = convert_to_random_ltd(model, config=RandomLTDConfig(total_layer_num=L))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (b, s), device=args.device)
    pos = torch.arange(s, device=args.device)[None].expand(b, s)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    ratios = [float(r) for r in args.ratios.split(",")]
    kept = [max(1, round(r * s)) for r in ratios]
    times: dict[int, list[float]] = {k: [] for k in kept}
    # interleaved: every round times each keep ratio once, so drift on a shared machine hits all ratios alike
    for it in range(args.warmup + args.iters):
        for k in kept:
            state.advance(0, {i: k for i in range(1, L - 1)})
            sync()
            t0 = time.perf_counter()
            loss = model(ids, pos, None, labels=ids).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if it >= args.warmup:
                times[k].append(time.perf_counter() - t0)
            state.finish_step()
    rows = [{"keep_ratio": r, "kept": k, "step_s": statistics.median(times[k]),
             "theoretical_saving": 1 - (2 * s + (L - 2) * k) / (L * s)} for r, k in zip(ratios, kept)]
    full = next(r["step_s"] for r in rows if r["kept"] == s)
    print(f"megatron-core GPT L={L} h={args.hidden_size} s={s} b={b} {dtype} on {device_name(args.device)}")
    print("| keep ratio | kept | step (ms) | realized saving | LayerToken saving | realized / theoretical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["realized_saving"] = 1 - r["step_s"] / full
        r["realized_over_theoretical"] = (r["realized_saving"] / r["theoretical_saving"]
                                          if r["theoretical_saving"] > 0 else None)
        ratio_txt = "-" if r["realized_over_theoretical"] is None else f"{r['realized_over_theoretical']:.2f}"
        print(f"| {r['keep_ratio']:.4g} | {r['kept']} | {1e3 * r['step_s']:.1f} | {100 * r['realized_saving']:.1f}% "
              f"| {100 * r['theoretical_saving']:.1f}% | {ratio_txt} |")
    result = {"device": device_name(args.device), "dtype": dtype, "num_layers": L, "hidden_size": args.hidden_size,
              "seq_length": s, "micro_batch_size": b, "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
