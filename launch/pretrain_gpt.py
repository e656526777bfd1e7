"""Pretrain a megatron-core GPT with DeepSpeed and random-LTD (the random-LTD block of the DeepSpeed config drives it).

The model is megatron-core's ``GPTModel`` (RoPE by default) whose middle layers come from
``random_ltd.integrations.megatron.gpt_layer_specs``; it trains on the engine ``random_ltd.initialize`` returns,
with megatron's tensor-parallel groups handed to DeepSpeed as ``mpu``. Run it with the DeepSpeed launcher (on CPU,
``LOCAL_SIZE`` sets the number of processes per node and megatron runs through random-LTD's CPU shim)::

    LOCAL_SIZE=2 deepspeed --num_gpus 2 launch/pretrain_gpt.py --deepspeed_config configs/tiny_gpt_cpu.json
    ... --baseline                        # same run, nothing dropped (layer-tokens still counted)
    ... --baseline --lr-schedule-of CFG   # nothing dropped, each step at the LR CFG's random-LTD run has there
    ... --tensor-model-parallel-size 2    # TP (indices identical on the TP ranks), + --sequence-parallel

Data: ``--data-path`` (a Megatron indexed dataset, with ``--vocab-size``) or the embedded corpus (bytes, written
once in Megatron's indexed format). Rank 0 writes a JSON result (validation curve against consumed layer-tokens,
savings, wall time) to ``--results``; ``--save``/``--load`` checkpoint and resume (random-LTD state included).
Checkpoints are crash-safe: a tag is never rewritten, ``latest`` names only tags every rank finished, ``--load``
of a directory without a checkpoint is an error (``--allow-fresh-start`` permits starting at step 0), and the ranks
end when the ``deepspeed`` launcher dies.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import random_ltd  # noqa: E402
from launch import megatron_train as mt  # noqa: E402
from launch.data import VOCAB_SIZE, open_datasets, windows  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mt.add_common_args(p, num_layers=8, hidden=128, heads=4, seq=256)
    p.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default="rope")
    args = p.parse_args(argv)
    mt.check_args(args)
    return args


def build_model(args: argparse.Namespace, ds_config: dict):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from random_ltd import RandomLTDConfig
    from random_ltd.integrations.megatron import gpt_layer_specs

    rltd = RandomLTDConfig.from_deepspeed(ds_config)
    norm = mt.layer_norm_override(args)
    base = mt.sequence_parallel_spec(get_gpt_layer_local_spec()) if norm is not None else None
    spec = gpt_layer_specs(args.num_layers, rltd if rltd.enabled else None, base_spec=base, layer_norm=norm)
    return GPTModel(mt.transformer_config(args), spec, vocab_size=args.vocab_size or VOCAB_SIZE,
                    max_sequence_length=args.seq_length, position_embedding_type=args.position_embedding_type)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ds_config = mt.deepspeed_config(args)
    mt.init_parallel(args)
    model = build_model(args, ds_config)
    from random_ltd.integrations.megatron import deepspeed_mpu

    engine, _, _, _ = random_ltd.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                            mpu=deepspeed_mpu())
    train, valid = open_datasets(args.data_path, args.valid_data_path, args.data_cache_dir)
    device = engine.device

    def loss_of(tokens, labels):
        import torch

        pos = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens)
        return engine(tokens.to(device), pos, None, labels=labels.to(device)).float().mean()

    def batch_loss(engine, index: int, micro: int):
        return loss_of(*windows(train, args.seq_length, micro, index, seed=args.seed))

    def eval_loss(engine, i: int, micro: int) -> float:
        return loss_of(*windows(valid, args.seq_length, micro, i, seed=10_000)).item()

    return mt.train(args, engine, batch_loss, eval_loss, "baseline" if args.baseline else "random-ltd")


if __name__ == "__main__":
    main()
