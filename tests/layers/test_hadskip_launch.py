"""launch/finetune_hadskip.py data helpers: GLUE TSV reader, KJV section labels, vocabulary and encoding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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


def _tiny_model(layers: int = 3):
    import transformers

    from random_ltd.config import HadSkipConfig
    from random_ltd.integrations.transformers.hadskip import HadSkipForSequenceClassification

    bert = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=8, num_labels=3,
                                   attn_implementation="eager", hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return HadSkipForSequenceClassification(transformers.BertForSequenceClassification(bert),
                                            config=HadSkipConfig(budget=1))


def test_budgeted_exit_answers_with_the_exit_of_layer_k():
    from random_ltd.hadskip_trainer import evaluate
    from random_ltd.layers.hadskip import set_gating, set_real_skip

    model = _tiny_model(3)
    g = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(4, 30, (6, 8), generator=g),
            "attention_mask": torch.ones(6, 8, dtype=torch.long), "labels": torch.randint(0, 3, (6,), generator=g)}
    before = [p.detach().clone() for p in model.parameters()]
    heads = ft.train_budgeted_exit(model, lambda step: data, steps=2, lr=1e-2)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the backbone is trained too
    model.eval()
    set_gating(model, False)
    with torch.no_grad():
        full = model(data["input_ids"], data["attention_mask"])
        expected = {k: heads.logits(model, k - 1, full.hidden_states[k - 1]) for k in (1, 2, 3)}
    assert not torch.allclose(expected[1], expected[2])  # the exits differ
    for k in (1, 2, 3):
        heads.use(model, k)
        for real in (True, False):
            set_gating(model, True)
            set_real_skip(model, real)
            with torch.no_grad():
                out = model(data["input_ids"], data["attention_mask"])
            torch.testing.assert_close(out.logits, expected[k])
            assert out.gates.sum(1).tolist() == [k] * 6
        r = evaluate(model, [data])
        assert r["mean_layers"] == k and r["predictions"] == expected[k].argmax(-1).tolist()


def test_seeds_table_and_tests(tmp_path):
    from launch.stats import compare

    def run(seed: int, had: float, top: float) -> dict:
        arm = {"accuracy": 0.0, "mean_layers": 3.0}
        return {"task": "t", "n_test": 10, "args": {"seed": str(seed)},
                "full": {"accuracy": 0.9}, "full_extra": {"accuracy": 0.9 + seed / 100},
                "budgets": {"3": {"top_k": {**arm, "accuracy": top}, "hadskip": {**arm, "accuracy": had}}}}

    runs = [run(0, 0.80, 0.70), run(1, 0.82, 0.71), run(2, 0.81, 0.69)]
    s = ft.aggregate(runs)
    assert s["budgets"]["3"]["hadskip"]["accuracy"]["values"] == [0.80, 0.82, 0.81]
    c = {(x["a"], x["b"]): x for x in s["comparisons"]}
    want = compare("hadskip@3", [0.80, 0.82, 0.81], "top_k@3", [0.70, 0.71, 0.69])
    assert c[("hadskip@3", "top_k@3")]["p"] == want.p and c[("hadskip@3", "top_k@3")]["significant"]
    assert ("full_extra@3", "top_k@3") in c and ("hadskip@3", "full_extra@3") in c
    ft.write_summary(s, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "| 3 | hadskip | 0.8100 ± 0.0100 | 3.00 ± 0.00 |" in text and "hadskip@3 − top_k@3" in text


def test_seeds_run_every_arm_and_write_the_table(tmp_path):
    import json

    cfg = tmp_path / "h.json"
    cfg.write_text(json.dumps({"hadskip": {"enabled": True, "budget": 1, "beta": 1.0, "beta_unit": "layers",
                                           "stages": {"stage1_steps": 3, "stage2_steps": 2, "stage3_steps": 3}}}))
    s = ft.main(["--config", str(cfg), "--max-eval", "40", "--layers", "2", "--hidden", "16", "--ffn", "32",
                 "--batch", "8", "--vocab", "200", "--seq-len", "8", "--budgets", "1",
                 "--arms", "top_k", "budgeted_exit", "hadskip", "--seeds", "2", "--out", str(tmp_path / "out")])
    assert s["seeds"] == ["0", "1"] and set(s["budgets"]["1"]) == {"top_k", "budgeted_exit", "hadskip"}
    assert s["budgets"]["1"]["budgeted_exit"]["mean_layers"]["values"] == [1.0, 1.0]
    pairs = {(c["a"], c["b"]) for c in s["comparisons"]}
    assert {("hadskip@1", "top_k@1"), ("hadskip@1", "budgeted_exit@1"), ("full_extra@1", "top_k@1")} <= pairs
    for seed in (0, 1):
        one = json.loads((tmp_path / "out" / f"seed{seed}" / "results.json").read_text())
        assert one["n_test"] == 40 and one["args"]["seed"] == str(seed)
    assert "hadskip@1 − budgeted_exit@1" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(SystemExit, match="--seeds must be >= 1"):
        ft.main(["--seeds", "0", "--out", str(tmp_path / "none")])


def _final_state(symbols: list[int], q: int = 0) -> int:
    for x in symbols:
        q = ft.AUTOMATON[q][x]
    return q


def test_automaton_examples_labels_and_depths():
    texts, labels, depths = ft.automaton_examples(300, seed=3, length=12)
    assert texts == ft.automaton_examples(300, seed=3, length=12)[0]  # deterministic in the seed
    assert texts != ft.automaton_examples(300, seed=4, length=12)[0]
    sym = {name: i for i, name in enumerate(ft.AUTOMATON_SYMBOLS)}
    for text, label, depth in zip(texts, labels, depths):
        xs = [sym[w] for w in ft.words(text)]
        assert len(xs) == 12 and label == _final_state(xs)
        starts = range(len(ft.AUTOMATON))
        if depth < 12:  # the last `depth` symbols fix the state from any start, one fewer does not
            assert len({_final_state(xs[12 - depth:], q) for q in starts}) == 1
        assert depth == 0 or len({_final_state(xs[12 - depth + 1:], q) for q in starts}) > 1
    assert len(set(depths)) >= 6  # the difficulty varies from word to word
    with pytest.raises(ValueError, match="length must be >= 1"):
        ft.automaton_examples(3, seed=0, length=0)


def test_by_depth_and_buckets():
    result = {"predictions": [0, 1, 1, 2], "layers_per_sequence": [2, 4, 6, 12]}
    groups = ft.by_depth(result, labels=[0, 1, 0, 2], depths=[2, 5, 5, 12])
    assert groups == {"2": {"n": 1, "accuracy": 1.0, "mean_layers": 2.0},
                      "5": {"n": 2, "accuracy": 0.5, "mean_layers": 5.0},
                      "12": {"n": 1, "accuracy": 1.0, "mean_layers": 12.0}}
    other = {"5": {"n": 2, "accuracy": 1.0, "mean_layers": 3.0}}
    b = ft.depth_buckets([groups, other])
    assert b["4-6"] == {"n": 4, "accuracy": 0.75, "mean_layers": 4.0} and b["0-3"]["n"] == 1 and "7-9" not in b
    assert b["10+"]["n"] == 1  # the last bucket is open: depth 23 of a 24-symbol word is counted too
    assert ft.depth_buckets([{"23": {"n": 3, "accuracy": 1.0, "mean_layers": 9.0}}])["10+"]["n"] == 3


def test_automaton_task_scratch_arm_and_parallel_seeds(tmp_path):
    import json

    cfg = tmp_path / "h.json"
    cfg.write_text(json.dumps({"hadskip": {"budget": 1, "stages": {"stage1_steps": 4, "stage2_steps": 2,
                                                                    "stage3_steps": 2, "stage1_warmup_steps": 2,
                                                                    "stage1_decay": "linear"}}}))
    common = ["--task", "automaton", "--automaton-examples", "300", "--config", str(cfg), "--max-eval", "30",
              "--layers", "3", "--hidden", "16", "--ffn", "32", "--batch", "8", "--seq-len", "9", "--budgets", "2",
              "--arms", "top_k", "scratch", "hadskip", "--seeds", "2"]
    one = ft.main(common + ["--out", str(tmp_path / "serial")])
    two = ft.main(common + ["--jobs", "2", "--out", str(tmp_path / "parallel")])
    assert one["budgets"] == two["budgets"] and one["by_depth"] == two["by_depth"]  # same numbers in processes
    assert one["budgets"]["2"]["scratch"]["mean_layers"]["values"] == [2.0, 2.0]
    pairs = {(c["a"], c["b"]) for c in one["comparisons"]}
    assert {("full_extra@2", "scratch@2"), ("hadskip@2", "scratch@2")} <= pairs
    seed0 = json.loads((tmp_path / "serial" / "seed0" / "results.json").read_text())
    assert sum(g["n"] for g in seed0["budgets"]["2"]["scratch"]["by_depth"].values()) == 30
    assert "automaton" in seed0["task"] and "by the depth" in (tmp_path / "serial" / "results.md").read_text()
    with pytest.raises(SystemExit, match="--jobs must be >= 1"):
        ft.main(common + ["--jobs", "0", "--out", str(tmp_path / "none")])


def test_pretrained_checkpoint_is_fine_tuned_with_its_tokenizer(tmp_path):
    """--pretrained DIR: stage 1 starts from the checkpoint's weights and its WordPiece tokenizer encodes the text."""
    import json

    import transformers

    from random_ltd.config import HadSkipConfig

    ckpt = tmp_path / "bert"
    ckpt.mkdir()
    words_ = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "fine", "film", "bad", "plot", "."]
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words_)}).save_pretrained(ckpt)
    torch.manual_seed(5)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=len(words_), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16))
    bert.save_pretrained(ckpt)
    glue = tmp_path / "glue"
    glue.mkdir()
    rows = "".join(f"{t}\t{y}\n" for t, y in [("a fine film .", 1), ("bad plot .", 0)] * 8)
    for split in ("train", "dev"):
        (glue / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    encode_texts, size = ft.pretrained_encoder(ckpt, 8)
    ids, mask = encode_texts(["a fine film ."])
    assert size == len(words_) and ids[0, :6].tolist() == [2, 5, 6, 7, 10, 3] and mask[0].tolist() == [1] * 6 + [0] * 2
    args = ft.parse_args(["--pretrained", str(ckpt), "--layers", "2", "--seq-len", "8"])
    model = ft.make_model(args, size, 2, HadSkipConfig(budget=1), weights=True)
    emb = model.base.embeddings.word_embeddings.weight
    torch.testing.assert_close(emb, bert.bert.embeddings.word_embeddings.weight)
    cfg = tmp_path / "h.json"
    cfg.write_text(json.dumps({"hadskip": {"budget": 1, "stages": {"stage1_steps": 2, "stage2_steps": 1,
                                                                    "stage3_steps": 1}}}))
    r = ft.main(["--pretrained", str(ckpt), "--glue-path", str(glue), "--config", str(cfg), "--layers", "2",
                 "--seq-len", "8", "--batch", "4", "--budgets", "1", "--arms", "top_k", "--out", str(tmp_path / "o")])
    assert r["n_test"] == 16 and r["budgets"]["1"]["top_k"]["mean_layers"] == 1.0
    with pytest.raises(SystemExit, match="has 2 layers but --layers is 3"):
        ft.main(["--pretrained", str(ckpt), "--glue-path", str(glue), "--config", str(cfg), "--layers", "3",
                 "--out", str(tmp_path / "x")])
