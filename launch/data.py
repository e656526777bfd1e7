"""Megatron indexed datasets for the entry points: the embedded corpus written once in that format, or a user's.

``--data-path PREFIX`` names a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``, as written by Megatron's
``tools/preprocess_data.py``); training samples windows of ``seq_len + 1`` tokens from its token stream, across
document boundaries like Megatron's GPTDataset. Without a path, the embedded corpus (launch/corpus.py, the King James
Bible as UTF-8 bytes, one document per verse) is written once into ``<cache>/kjv_bytes_{train,valid}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from launch.corpus import VOCAB_SIZE, corpus_path

__all__ = ["TokenStream", "embedded_dataset", "open_datasets", "VOCAB_SIZE"]

DEFAULT_CACHE = Path(os.environ.get("RANDOM_LTD_CACHE", Path.home() / ".cache" / "random_ltd"))


def _write_indexed(prefix: Path, documents: list[bytes]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    # Written under a private name, then renamed: ranks that start together never read a half-written file.
    tmp = prefix.with_name(f"{prefix.name}.tmp{os.getpid()}")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=np.uint8)
    for doc in documents:
        builder.add_document(torch.from_numpy(np.frombuffer(doc, dtype=np.uint8).copy()), [len(doc)])
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")


def embedded_dataset(cache_dir: str | Path | None = None, valid_fraction: float = 0.02) -> tuple[str, str]:
    """(train, valid) indexed-dataset prefixes of the embedded corpus, written on first use."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    train, valid = cache / "kjv_bytes_train", cache / "kjv_bytes_valid"
    if not all(Path(f"{p}.{ext}").exists() for p in (train, valid) for ext in ("bin", "idx")):
        with open(corpus_path()) as f:
            verses = [(json.loads(line)["text"] + "\n").encode("utf-8") for line in f]
        split = int(len(verses) * (1 - valid_fraction))
        _write_indexed(train, verses[:split])
        _write_indexed(valid, verses[split:])
    return str(train), str(valid)


class TokenStream:
    """The token stream of a Megatron indexed dataset (memory-mapped) and deterministic training windows."""

    def __init__(self, prefix: str) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if not IndexedDataset.exists(prefix):
            raise FileNotFoundError(f"--data-path: no Megatron indexed dataset at {prefix!r} "
                                    f"(expected {prefix}.bin and {prefix}.idx)")
        dtype = IndexedDataset(prefix).index.dtype
        self.tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        cut = int(len(self.tokens) * (1 - fraction))
        return self.tokens[:cut], self.tokens[cut:]


def windows(tokens: np.ndarray, seq_len: int, batch: int, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index``: ``batch`` random windows of ``seq_len + 1`` tokens -> (inputs, next-token labels)."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"dataset has {len(tokens)} tokens, fewer than seq_length + 1 = {seq_len + 1}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=g).tolist()
    w = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
    return w[:, :-1], w[:, 1:]


def open_datasets(data_path: str | None, valid_data_path: str | None = None,
                  cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) token arrays: the user's indexed dataset(s) (2% held out without a valid path) or the corpus."""
    if data_path is None:
        train, valid = embedded_dataset(cache_dir)
        return TokenStream(train).tokens, TokenStream(valid).tokens
    stream = TokenStream(data_path)
    if valid_data_path:
        return stream.tokens, TokenStream(valid_data_path).tokens
    return stream.split(0.02)
