"""Pretrain a small GPT with DeepSpeed and random-LTD (the random-LTD block of the DeepSpeed config drives it).

Run with the DeepSpeed launcher (on CPU, ``LOCAL_SIZE`` sets the number of processes per node)::

    LOCAL_SIZE=2 deepspeed --num_gpus 2 launch/pretrain_gpt.py --deepspeed_config configs/tiny_gpt_cpu.json
    ... --baseline          # same run, nothing dropped (layer-tokens still counted)

Data: the embedded corpus (launch/corpus.py) or ``--data-path`` to a UTF-8 text file. Rank 0 writes a JSON result
(validation curve against consumed layer-tokens, savings, wall time) to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import random_ltd  # noqa: E402
from launch.corpus import VOCAB_SIZE, batch_at, load_corpus  # noqa: E402
from launch.model import GPT, GPTConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config (with the random-LTD block)")
    p.add_argument("--baseline", action="store_true", help="switch random-LTD off (keeps layer-token accounting)")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--train-layer-tokens", type=float, default=None,
                   help="stop once this many layer-tokens are consumed (equal-budget comparisons)")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--data-path", default=None, help="UTF-8 text file (default: the embedded corpus)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save", default=None, help="checkpoint directory to save to at the end")
    p.add_argument("--load", default=None, help="checkpoint directory to resume from")
    p.add_argument("--results", default=None, help="JSON file for rank 0's results")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return p.parse_args(argv)


def set_random_ltd(ds_config: dict, enabled: bool, num_layers: int, seq_length: int) -> dict:
    """Make the config's random-LTD block match the model (L, max length) and the --baseline switch."""
    block = ds_config.setdefault("data_efficiency", {}).setdefault("data_routing", {}).setdefault("random_ltd", {})
    if not enabled:
        # the baseline keeps the config's iteration "scheduler" block; LayerToken LR belongs to random-LTD
        block["enabled"] = False
        block.get("layer_token_lr_schedule", {})["enabled"] = False
        return ds_config
    block.setdefault("total_layer_num", num_layers)
    block.setdefault("random_ltd_schedule", {}).setdefault("max_value", seq_length)
    return ds_config


@torch.no_grad()
def evaluate(engine, valid: torch.Tensor, args, micro_batch: int) -> float:
    engine.eval()
    losses = [float(engine(*batch_at(valid, args.seq_length, micro_batch, i, seed=10_000 + i)))
              for i in range(args.eval_iters)]
    engine.train()
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with open(args.deepspeed_config) as f:
        ds_config = json.load(f)
    ds_config = set_random_ltd(ds_config, not args.baseline, args.num_layers, args.seq_length)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", 1))))
    model = GPT(GPTConfig(VOCAB_SIZE, args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length))
    engine, _, _, _ = random_ltd.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    if args.load:
        engine.load_checkpoint(args.load)

    train, valid = load_corpus(args.data_path)
    rank = engine.global_rank
    micro = engine.train_micro_batch_size_per_gpu()
    gas = engine.gradient_accumulation_steps()
    sched = engine.random_ltd_schedule
    curve = []
    start = time.perf_counter()
    step = sched.step
    while step < args.train_iters:
        if args.train_layer_tokens is not None and sched.consumed_layer_tokens >= args.train_layer_tokens:
            break
        for mb in range(gas):
            # every rank reads its own shard of the global batch, the same data order in every arm
            index = (step * gas + mb) * engine.dp_world_size + engine.global_rank
            loss = engine(*batch_at(train, args.seq_length, micro, index, seed=args.seed))
            engine.backward(loss)
            engine.step()
        step = sched.step
        if step % args.eval_interval == 0 or step == args.train_iters:
            val = evaluate(engine, valid, args, micro)
            curve.append({"step": step, "layer_tokens": sched.consumed_layer_tokens, "val_loss": val,
                          "train_loss": loss.item()})
            if rank == 0:
                print(f"step {step:5d} | loss {loss.item():.4f} | val {val:.4f} | kept "
                      f"{engine.random_ltd_monitor.last.get('random_ltd/kept_length', 0):.0f} | saved "
                      f"{100 * sched.saved_fraction:.1f}% | lr {engine.get_lr()[0]:.2e}", flush=True)
    wall = time.perf_counter() - start
    if args.save:
        engine.save_checkpoint(args.save)
    result = {
        "arm": "baseline" if args.baseline else "random-ltd",
        "steps": sched.step,
        "consumed_layer_tokens": sched.consumed_layer_tokens,
        "baseline_layer_tokens": sched.baseline_layer_tokens,
        "saved_percent": 100 * sched.saved_fraction,
        "final_val_loss": curve[-1]["val_loss"] if curve else math.nan,
        "wall_s": wall,
        "curve": curve,
        "world_size": engine.world_size,
    }
    if rank == 0:
        print(engine.random_ltd_summary(), flush=True)
        if args.results:
            os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
            with open(args.results, "w") as f:
                json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
