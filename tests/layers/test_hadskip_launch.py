"""launch/finetune_hadskip.py data helpers: GLUE TSV reader, KJV section labels, vocabulary and encoding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from launch import finetune_hadskip as ft  # noqa: E402


def test_read_glue_single_and_pair(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nA fine film .\t1\nbad \"quote plot\t0\n")
    texts, labels, names = ft.read_glue(tmp_path, "train")
    assert texts == ["A fine film .", 'bad "quote plot'] and labels == [1, 0] and names == ["0", "1"]
    (tmp_path / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA cat.\tA dog.\tnot_entailment\n")
    texts, labels, names = ft.read_glue(tmp_path, "dev")
    assert texts == ["A cat. [SEP] A dog."] and names == ["not_entailment"]
    (tmp_path / "bad.tsv").write_text("text\tlabel\nx\t0\n")
    with pytest.raises(ValueError, match="no known text columns"):
        ft.read_glue(tmp_path, "bad")


def test_kjv_sections():
    texts, labels = ft.kjv_examples()
    assert len(texts) == 31103 and labels[0] == 0 and labels[-1] == 4
    assert sorted(set(labels)) == [0, 1, 2, 3, 4] and labels == sorted(labels)


def test_vocab_and_encode():
    vocab = ft.build_vocab(["the cat", "the dog [SEP] the end"], 6)
    assert vocab["the"] == 4 and len(vocab) == 6
    ids, mask = ft.encode(["the zebra the the the"], vocab, 4)
    assert ids.tolist() == [[ft.CLS, 4, ft.UNK, 4]] and mask.tolist() == [[1, 1, 1, 1]]
    ids, mask = ft.encode(["the"], vocab, 4)
    assert ids.tolist() == [[ft.CLS, 4, ft.PAD, ft.PAD]] and mask.tolist() == [[1, 1, 0, 0]]
