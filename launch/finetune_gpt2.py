"""GPT-2 causal-LM fine-tuning, baseline vs random-LTD, through ``RandomLTDTrainer`` (paper Appendix D.4, scaled to
a CPU).

    python launch/finetune_gpt2.py --out benchmarks/results/finetune_gpt2_cpu           # tiny random-init GPT-2
    python launch/finetune_gpt2.py --model gpt2-medium --seq-length 1024 --batch 32 ...   # the paper's setting

Paper setting (GPT-2 350M on PTB): batch 32, constant LR 5e-5, random-LTD on every layer but the first and last,
kept length from 128 of 1024 (1/8) growing linearly to the full length at 80% of the iterations. Here the defaults
keep that shape: keep start ratio 1/8, ramp 80%, constant LR.

Model: ``--model`` is a local path or a hub name (loaded with ``AutoModelForCausalLM`` and its tokenizer); without
it, a small random-init ``GPT2Config`` over UTF-8 bytes (vocabulary 256; no download). Data: the embedded King James
Bible corpus (launch/corpus.py) or ``--data-path`` to a UTF-8 text file; training windows are drawn at random
(seeded), validation uses fixed windows of the held-out 2%.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.corpus import VOCAB_SIZE, load_corpus  # noqa: E402
from launch.finetune_common import fit_block, load_ds_config, run_arm, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Windows(torch.utils.data.Dataset):
    """``count`` windows of ``seq_len`` tokens at seeded random offsets (labels = inputs; GPT-2 shifts them)."""

    def __init__(self, stream: torch.Tensor, seq_len: int, count: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(stream) - seq_len, (count,), generator=g).tolist()
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        x = self.stream[self.starts[i]:self.starts[i] + self.seq_len].long()
        return {"input_ids": x, "labels": x}


def build_model(args: argparse.Namespace):
    """(model factory, train stream, valid stream)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    train, valid = load_corpus(args.data_path)
    if args.model is None:
        cfg = GPT2Config(n_layer=args.num_layers, n_embd=args.hidden_size, n_head=args.num_heads,
                         vocab_size=VOCAB_SIZE, n_positions=args.seq_length, bos_token_id=0, eos_token_id=0,
                         resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout)

        def factory():
            torch.manual_seed(args.seed)
            return GPT2LMHeadModel(cfg)

        return factory, train, valid
    streams = [train, valid]
    if args.tokenizer == "auto":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        streams = [torch.tensor(tok(bytes(part.tolist()).decode("utf-8", errors="ignore"))["input_ids"],
                                dtype=torch.int64) for part in (train, valid)]

    def factory():
        torch.manual_seed(args.seed)
        return AutoModelForCausalLM.from_pretrained(args.model)

    return factory, streams[0], streams[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local path or hub name (default: tiny random-init GPT-2)")
    p.add_argument("--tokenizer", choices=("auto", "bytes"), default="auto",
                   help="with --model: its own tokenizer (auto) or raw UTF-8 bytes (a model with >= 256 tokens)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_gpt2_finetune_cpu.json"),
                   help="DeepSpeed JSON config holding the random-LTD block")
    p.add_argument("--deepspeed", action="store_true", help="run the Trainer under DeepSpeed with --config")
    p.add_argument("--data-path", default=None, help="UTF-8 text file (default: the embedded corpus)")
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3, help="constant LR (paper: 5e-5 for pretrained GPT-2 350M)")
    p.add_argument("--start-ratio", type=float, default=1 / 8, help="kept length at step 0 / seq length (paper 1/8)")
    p.add_argument("--ramp", type=float, default=0.8, help="fraction of steps to reach the full length (paper 0.8)")
    p.add_argument("--seq-per-step", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--arms", default="baseline,random-ltd")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="outputs/finetune_gpt2")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    factory, train, valid = build_model(args)
    train_set = Windows(train, args.seq_length, args.steps * args.batch, args.seed)
    eval_set = Windows(valid, args.seq_length, args.eval_windows, args.seed + 1)
    ds = load_ds_config(args.config)
    results = []
    for arm in args.arms.split(","):
        model = factory()
        layers = model.config.num_hidden_layers
        cfg = fit_block(ds, enabled=arm != "baseline", num_layers=layers, seq_len=args.seq_length,
                        steps=args.steps, start_ratio=args.start_ratio, ramp=args.ramp,
                        seq_per_step=args.seq_per_step)
        print(f"== {arm}", flush=True)
        results.append(run_arm(arm, model, cfg, train_set, eval_set, out=out, steps=args.steps, batch=args.batch,
                               lr=args.lr, eval_every=args.eval_every, seed=args.seed, deepspeed=args.deepspeed))
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
    print(write_outputs(results, out, "GPT-2 causal-LM fine-tuning (CPU): baseline vs random-LTD", command))


if __name__ == "__main__":
    main()
