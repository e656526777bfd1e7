"""ViT image classification, baseline vs random-LTD, through ``RandomLTDTrainer`` (paper Appendix D.3, scaled to a
CPU).

    python launch/finetune_vit.py --out benchmarks/results/finetune_vit_cpu          # scikit-learn digits
    python launch/finetune_vit.py --patch-size 2                                      # 16 tokens of 2x2 patches
    python launch/finetune_vit.py --torchvision CIFAR10 --data-root /data/cifar --image-size 32 --patch-size 4

Paper setting (ViT on ImageNet / CIFAR): random-LTD on every layer but the first and last, kept length from 66 of
197 tokens (about 1/3; CIFAR: 32 of 197) growing linearly to the full length at 80% of the iterations, constant LR.
Here the defaults keep that shape (keep start ratio 66/197, ramp 80%, constant LR).

Data: scikit-learn's ``load_digits`` (1,797 real 8x8 grey images of 10 digits; ships offline), split 1,497 train /
300 validation with a fixed seed; with ``--patch-size 1`` each pixel is a token (64 tokens + [CLS] = 65). With
``--torchvision NAME --data-root PATH``, a torchvision dataset class read from PATH (never downloaded).
Model: a small random-init ``ViTConfig`` (no download), or ``--model`` (local path or hub name) loaded with
``AutoModelForImageClassification`` (its image size and channels must match the data).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.finetune_common import fit_block, load_ds_config, run_arm, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Images(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def digits(seed: int) -> tuple[Images, Images, int, int]:
    """scikit-learn digits as [n, 1, 8, 8] floats in [0, 1] (normalised per dataset), split 1497 / 300."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, valid = perm[:-300], perm[-300:]
    return Images(x[train], y[train]), Images(x[valid], y[valid]), 8, 1


def torchvision_data(name: str, root: str, image_size: int) -> tuple[Images, Images, int, int]:
    try:
        import torchvision
    except ImportError as exc:
        raise SystemExit("--torchvision needs the torchvision package (pip install torchvision)") from exc
    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise SystemExit(f"--torchvision: torchvision.datasets has no {name!r}")
    tf = torchvision.transforms.Compose([torchvision.transforms.Resize((image_size, image_size)),
                                         torchvision.transforms.ToTensor()])
    sets = []
    for train in (True, False):
        ds = cls(root=root, train=train, download=False, transform=tf)
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        sets.append(Images(torch.stack(xs), torch.tensor(ys, dtype=torch.int64)))
    return sets[0], sets[1], image_size, sets[0].pixels.shape[1]


def accuracy(pred) -> dict:
    logits, labels = pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local path or hub name (default: tiny random-init ViT)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_vit_digits_cpu.json"),
                   help="DeepSpeed JSON config holding the random-LTD block")
    p.add_argument("--deepspeed", action="store_true", help="run the Trainer under DeepSpeed with --config")
    p.add_argument("--torchvision", default=None, help="torchvision dataset class name (with --data-root)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--image-size", type=int, default=32, help="resize for --torchvision datasets")
    p.add_argument("--patch-size", type=int, default=1, help="1: 64 pixel tokens of a digit; 2: 16 tokens")
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3, help="constant LR (paper: 5e-5 / 1e-4 for pretrained ViTs)")
    p.add_argument("--start-ratio", type=float, default=66 / 197, help="kept tokens at step 0 / tokens (paper)")
    p.add_argument("--ramp", type=float, default=0.8, help="fraction of steps to reach the full length (paper)")
    p.add_argument("--seq-per-step", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--arms", default="baseline,random-ltd")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="outputs/finetune_vit")
    args = p.parse_args(argv)

    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    if args.torchvision:
        if not args.data_root:
            raise SystemExit("--torchvision needs --data-root PATH (datasets are never downloaded)")
        train_set, eval_set, size, channels = torchvision_data(args.torchvision, args.data_root, args.image_size)
    else:
        train_set, eval_set, size, channels = digits(args.seed)
    num_labels = int(train_set.labels.max()) + 1
    tokens = (size // args.patch_size) ** 2 + 1  # + [CLS]

    def factory():
        torch.manual_seed(args.seed)
        if args.model:
            return AutoModelForImageClassification.from_pretrained(args.model, num_labels=num_labels,
                                                                   ignore_mismatched_sizes=True)
        cfg = ViTConfig(num_hidden_layers=args.num_layers, hidden_size=args.hidden_size,
                        num_attention_heads=args.num_heads, intermediate_size=4 * args.hidden_size,
                        image_size=size, patch_size=args.patch_size, num_channels=channels, num_labels=num_labels,
                        hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
        return ViTForImageClassification(cfg)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_ds_config(args.config)
    results = []
    for arm in args.arms.split(","):
        model = factory()
        cfg = fit_block(ds, enabled=arm != "baseline", num_layers=model.config.num_hidden_layers, seq_len=tokens,
                        steps=args.steps, start_ratio=args.start_ratio, ramp=args.ramp,
                        seq_per_step=args.seq_per_step)
        print(f"== {arm}", flush=True)
        results.append(run_arm(arm, model, cfg, train_set, eval_set, out=out, steps=args.steps, batch=args.batch,
                               lr=args.lr, eval_every=args.eval_every, seed=args.seed, compute_metrics=accuracy,
                               deepspeed=args.deepspeed))
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
    print(write_outputs(results, out, "ViT on scikit-learn digits (CPU): baseline vs random-LTD"
                        if not args.torchvision else f"ViT on {args.torchvision}: baseline vs random-LTD", command))


if __name__ == "__main__":
    main()
