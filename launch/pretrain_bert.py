"""Pretrain a megatron-core BERT (masked LM) with DeepSpeed and random-LTD.

The model is megatron-core's ``BertModel`` built with ``random_ltd.integrations.megatron.bert_layer_spec`` (one spec
for all layers; the random-LTD block's layer ids decide which ones drop). Batches carry a padding mask: a quarter of
the samples are cut short and padded, and the padded positions are masked out of attention in every layer, kept or
dropped. Run it like launch/pretrain_gpt.py::

    LOCAL_SIZE=2 deepspeed --num_gpus 2 launch/pretrain_bert.py --deepspeed_config configs/tiny_bert_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import random_ltd  # noqa: E402
from launch import megatron_train as mt  # noqa: E402
from launch.data import VOCAB_SIZE, open_datasets, windows  # noqa: E402

MASK_ID, PAD_ID = VOCAB_SIZE, VOCAB_SIZE + 1
BERT_VOCAB = VOCAB_SIZE + 16  # bytes + [MASK] + [PAD], padded to a multiple of 16 (divisible by tp)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mt.add_common_args(p, num_layers=8, hidden=128, heads=4, seq=128)
    p.add_argument("--mask-prob", type=float, default=0.15, help="fraction of tokens masked for the MLM loss")
    args = p.parse_args(argv)
    mt.check_args(args)
    if args.data_path is not None:
        raise SystemExit("pretrain_bert.py: --data-path is not supported yet (needs the tokenizer's [MASK]/[PAD] "
                         "ids); it trains on the embedded corpus")
    return args


def mlm_batch(tokens: torch.Tensor, seed: int, index: int, mask_prob: float):
    """(input_ids, attention_mask [b, s] 1 = real token, labels, loss_mask) with some samples padded."""
    g = torch.Generator().manual_seed(seed * 7_919 + index)
    b, s = tokens.shape
    lengths = torch.full((b,), s)
    short = torch.rand(b, generator=g) < 0.25
    lengths[short] = torch.randint(s // 4, s, (int(short.sum()),), generator=g)
    real = torch.arange(s)[None] < lengths[:, None]
    masked = (torch.rand(b, s, generator=g) < mask_prob) & real
    ids = tokens.masked_fill(masked, MASK_ID).masked_fill(~real, PAD_ID)
    return ids, real.long(), tokens, masked.float()


def build_model(args: argparse.Namespace):
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel

    from random_ltd.integrations.megatron import bert_layer_spec

    norm = mt.layer_norm_override(args)
    spec = bert_layer_spec(mt.sequence_parallel_spec(bert_layer_local_spec) if norm is not None else None)
    return BertModel(config=mt.transformer_config(args), transformer_layer_spec=spec, vocab_size=BERT_VOCAB,
                     max_sequence_length=args.seq_length, num_tokentypes=0, add_binary_head=False)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ds_config = mt.deepspeed_config(args)
    mt.init_parallel(args)
    model = build_model(args)
    from random_ltd.integrations.megatron import deepspeed_mpu

    engine, _, _, _ = random_ltd.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                            mpu=deepspeed_mpu())
    train, valid = open_datasets(None, None, args.data_cache_dir)
    device = engine.device

    def loss_of(stream, seed: int, index: int, micro: int):
        tokens, _ = windows(stream, args.seq_length, micro, index, seed=seed)
        ids, attn, labels, loss_mask = (t.to(device) for t in mlm_batch(tokens, seed, index, args.mask_prob))
        lm_loss, _ = engine(ids, attn, lm_labels=labels)
        return (lm_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)

    def batch_loss(engine, index: int, micro: int):
        return loss_of(train, args.seed, index, micro)

    def eval_loss(engine, i: int, micro: int) -> float:
        return loss_of(valid, 10_000, i, micro).item()

    return mt.train(args, engine, batch_loss, eval_loss, "baseline" if args.baseline else "random-ltd")


if __name__ == "__main__":
    main()
