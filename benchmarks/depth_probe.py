"""Does depth pay on a task built to need it, at this CPU scale? Permutation tracking, 3 vs 12 layers.

The task: the position of element 0 after applying a word of 1-12 permutations of S3 (two transpositions, two
3-cycles), one token each; the label is that position (3 classes, chance 1/3), and a word's length is the number of
compositions it needs. A plain BERT classifier (HadSkip's backbone: hidden 64, 2 heads, FFN 128, post-LN, [CLS]
pooling) is trained from scratch for ``--steps`` steps (batch 32, AdamW 1e-3, 300 warmup steps, linear decay) on
54,000 words and tested on 2,000, one thread, seed 0. Prints (and with ``--out`` writes) one JSON line per depth:
accuracy overall and by word length. Used to look for a HadSkip task where the full model beats a shallow one
(README, Status)::

    python benchmarks/depth_probe.py --layers 3 12 --out benchmarks/results/depth_probe_s3/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

GENERATORS = ((1, 0, 2), (1, 2, 0), (0, 2, 1), (2, 0, 1))  # S3: transpositions and 3-cycles, as position maps
MAX_LEN = 12


def words(n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``n`` words: token ids ([CLS]=1, symbols 2.., padding 0), labels, lengths."""
    xs, ys, lengths = [], [], []
    for _ in range(n):
        m = rng.randint(1, MAX_LEN)
        w = [rng.randrange(len(GENERATORS)) for _ in range(m)]
        q = 0
        for x in w:
            q = GENERATORS[x][q]
        xs.append([1] + [2 + x for x in w] + [0] * (MAX_LEN - m))
        ys.append(q)
        lengths.append(m)
    return torch.tensor(xs), torch.tensor(ys), lengths


def run(layers: int, steps: int) -> dict:
    import transformers

    torch.manual_seed(0)
    rng = random.Random(0)
    x_train, y_train, _ = words(54000, rng)
    x_test, y_test, lengths = words(2000, rng)
    cfg = transformers.BertConfig(vocab_size=2 + len(GENERATORS), hidden_size=64, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=128, max_position_embeddings=MAX_LEN + 1,
                                  num_labels=3, attn_implementation="eager")
    model = transformers.BertForSequenceClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 300, max(0.0, (steps - s) / (steps - 300))))
    t0 = time.time()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (32,), generator=g)
        x = x_train[idx]
        out = model(input_ids=x, attention_mask=(x != 0).long(), labels=y_train[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(input_ids=x_test[i:i + 200], attention_mask=(x_test[i:i + 200] != 0).long())
                          .logits.argmax(-1) for i in range(0, len(x_test), 200)])
    ok = (pred == y_test).tolist()
    by: dict[str, list[bool]] = {}
    for m, o in zip(lengths, ok):
        by.setdefault("1-3" if m <= 3 else "4-6" if m <= 6 else "7-9" if m <= 9 else "10-12", []).append(o)
    return {"task": "s3", "layers": layers, "steps": steps, "accuracy": sum(ok) / len(ok),
            "train_s": round(time.time() - t0), "accuracy_by_length": {k: round(sum(v) / len(v), 3)
                                                                        for k, v in sorted(by.items())}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 12])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", type=Path, default=None, help="JSON lines file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = []
    for layers in args.layers:
        lines.append(json.dumps(run(layers, args.steps)))
        print(lines[-1], flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
