"""Training script run by the ``deepspeed`` launcher in tests/integrations/test_deepspeed_launcher.py.

Each rank trains TinyGPT through ``random_ltd.initialize`` on its own data shard and writes
``<out>/rank<global rank>.json``: its data-parallel rank, the indices it draws for a random-LTD layer at step 0
(and whether the real forward used exactly those), the kept lengths it ran, the final schedule counters and a
checksum of the weights.

    deepspeed --num_gpus 2 tests/integrations/ds_worker.py --out DIR [--steps N] [--gas G]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: random_ltd
sys.path.insert(0, str(HERE.parent / "layers"))  # tiny_models

import torch  # noqa: E402
from tiny_models import TinyGPT  # noqa: E402

import random_ltd  # noqa: E402

L, SEQ, VOCAB, MB = 4, 32, 64, 2
LAYER = 1  # the random-LTD layer whose indices are reported
KEPT = [8, 8, 16, 16, 24, 24, 32]  # fixed_linear: min 8, max 32, require_steps 6, seq_per_step 8


def config(gas: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": gas, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "data_efficiency": {"enabled": True, "seed": 1234, "data_routing": {"enabled": True, "random_ltd": {
            "enabled": True, "total_layer_num": L, "random_ltd_layer_num": 2, "random_ltd_layer_id": [1, 2],
            "model_mask_name": "attention_mask", "model_type": "decoder", "hidden_state_order": "batch_seq_dim",
            "random_ltd_schedule": {"min_value": 8, "max_value": SEQ, "schedule_type": "fixed_linear",
                                    "schedule_config": {"require_steps": 6, "seq_per_step": 8}}}}},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gas", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyGPT(vocab=VOCAB, layers=L, seq=SEQ)
    engine, *_ = random_ltd.initialize(model=model, model_parameters=model.parameters(), config=config(args.gas))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    state = engine.random_ltd_state

    # the indices this rank draws for LAYER in the first micro-batch of step 0 (a pure function of the key)
    first_indices = state.indices(LAYER, MB, SEQ, state.kept_length(LAYER, SEQ), torch.device("cpu"))
    checks: dict[str, bool] = {}
    kept_seen: list[int] = []

    def hook(module, inputs, output) -> None:
        hidden = inputs[0]
        untouched = (output == hidden).all(-1)  # rows the layer passed through
        if state.step == 0 and state.micro_batch == 0:
            kept = torch.zeros_like(untouched)
            kept.scatter_(1, first_indices, True)
            checks["forward_used_indices"] = bool(torch.equal(untouched, ~kept))
        kept_seen.append(int((~untouched).sum(1).max()))

    handle = engine.module.layers[LAYER].register_forward_hook(hook)
    losses = []
    for step in range(args.steps):
        for micro in range(args.gas):
            g = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)  # each rank its own shard
            tokens = torch.randint(0, VOCAB, (MB, SEQ + 1), generator=g)
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    handle.remove()

    sched = engine.random_ltd_schedule
    weights = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    result = {
        "rank": rank, "world_size": world, "local_rank": args.local_rank,
        "data_parallel_rank": state.data_parallel_rank, "dp_world_size": engine.dp_world_size,
        "seed": state.effective_seed, "indices_step0": first_indices.tolist(), "checks": checks,
        "kept_seen": kept_seen, "losses": losses,
        "schedule": {"step": sched.step, "consumed_layer_tokens": sched.consumed_layer_tokens,
                     "baseline_layer_tokens": sched.baseline_layer_tokens, "consumed_samples": sched.consumed_samples,
                     "consumed_tokens": sched.consumed_tokens},
        "global_steps": engine.global_steps, "weights_sum": float(weights.double().sum()),
        "weights": [float(v) for v in weights[:64]],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rank}.json"
    tmp.write_text(json.dumps(result))
    tmp.rename(out / f"rank{rank}.json")


if __name__ == "__main__":
    main()
