"""HadSkip on random-init Hugging Face BERT/RoBERTa classifiers (no downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from random_ltd.config import HadSkipConfig  # noqa: E402
from random_ltd.hadskip_trainer import HadSkipTrainer, evaluate, kd_losses  # noqa: E402
from random_ltd.integrations.transformers.hadskip import HadSkipForSequenceClassification  # noqa: E402
from random_ltd.layers.hadskip import set_gating, set_real_skip  # noqa: E402

KW = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
          max_position_embeddings=40, num_labels=3, attn_implementation="eager", attention_probs_dropout_prob=0.0)


def _hf(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**KW))
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(pad_token_id=1, **KW))


def _batch(b=5, s=9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_gating_off_and_all_ones_equal_the_hf_model_bitwise(kind):
    hf = _hf(kind).eval()
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    model = HadSkipForSequenceClassification(hf, init_keep_logit=60.0).eval()
    set_gating(model, False)
    with torch.no_grad():
        out = model(ids, mask)
        assert torch.equal(out.logits, ref)
        set_gating(model, True)
        gated = model(ids, mask)
    assert torch.equal(gated.gates, torch.ones(5, 3))
    assert torch.equal(gated.logits, ref)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_training_outputs_attention_gates_and_gradients(kind):
    model = HadSkipForSequenceClassification(_hf(kind), init_keep_logit=0.0).train()
    ids, mask = _batch(b=12)
    out = model(ids, mask)
    assert out.gates.shape == (12, 3) and set(out.gates.unique().tolist()) <= {0.0, 1.0}
    assert len(out.hidden_states) == 3 and out.embeddings.shape == (12, 9, 16)
    assert all(a is not None and a.shape == (12, 9, 9) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(12, 9))
    out.logits.square().sum().backward()
    assert all(layer.gate.fc1.weight.grad.abs().sum() > 0 for layer in model.layers)


def test_real_skip_matches_masked_and_skips_sequences():
    model = HadSkipForSequenceClassification(_hf("bert"), init_keep_logit=0.0).eval()
    for layer in model.layers:
        torch.nn.init.normal_(layer.gate.fc2.weight, std=4.0)
    ids, mask = _batch(b=16)
    seen = []
    hooks = [m.layer.register_forward_pre_hook(lambda mod, args, i=i: seen.append((i, args[0].shape[0])))
             for i, m in enumerate(model.layers)]
    with torch.no_grad():
        set_real_skip(model, True)
        real = model(ids, mask)
        for h in hooks:
            h.remove()
        set_real_skip(model, False)
        masked = model(ids, mask)
    torch.testing.assert_close(real.logits, masked.logits)
    assert seen == [(i, int(n)) for i, n in enumerate(real.gates.sum(0).tolist()) if n > 0]
    assert 0 < real.gates.sum() < real.gates.numel()


def test_kd_zero_for_teacher_copy_and_trainer_runs(tmp_path):
    model = HadSkipForSequenceClassification(_hf("bert"))
    cfg = HadSkipConfig(budget=1, num_layers=3, homotopic={"steps_per_stage": 1},
                        stages={"stage1_steps": 2, "stage2_steps": 2, "stage3_steps": 3})
    ids, mask = _batch()
    batches = lambda step: {"input_ids": ids, "attention_mask": mask, "labels": ids[:, 0] % 3}  # noqa: E731
    trainer = HadSkipTrainer(model, cfg)
    trainer.train_stage(1, batches, checkpoint_dir=tmp_path)
    teacher = trainer.make_teacher(tmp_path / "stage1.pt")
    model.train()
    set_gating(model, False)
    for layer in model.modules():  # dropout off, so the student's forward is deterministic
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    with torch.no_grad():
        losses = kd_losses(model(ids, mask), teacher(ids, mask))
    assert all(v.item() == 0.0 for v in losses.values()), losses
    trainer.train_stage(2, batches, checkpoint_dir=tmp_path)
    logs = trainer.train_stage(3, batches, checkpoint_dir=tmp_path)
    assert [e["budget"] for e in logs] == [3.0, 2.0, 1.0]
    assert sum(e["kd_att"] for e in logs) > 0.0  # the eval-mode teacher records attention maps too
    result = evaluate(model, [{"input_ids": ids, "attention_mask": mask, "labels": ids[:, 0] % 3}])
    assert len(result["layers_per_sequence"]) == 5


def test_errors():
    with pytest.raises(TypeError, match="BertForSequenceClassification"):
        HadSkipForSequenceClassification(torch.nn.Linear(2, 2))
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**{**KW, "attn_implementation": "sdpa"}))
    with pytest.raises(ValueError, match="eager"):
        HadSkipForSequenceClassification(hf)
    HadSkipForSequenceClassification(hf, record_attentions=False)


def test_real_skip_with_sdpa_masks():
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**{**KW, "attn_implementation": "sdpa"}))
    model = HadSkipForSequenceClassification(hf, record_attentions=False, init_keep_logit=0.0).eval()
    for layer in model.layers:
        torch.nn.init.normal_(layer.gate.fc2.weight, std=4.0)
    ids, mask = _batch(b=16)
    with torch.no_grad():
        set_real_skip(model, True)
        real = model(ids, mask)
        set_real_skip(model, False)
        masked = model(ids, mask)
    assert 0 < real.gates.sum() < real.gates.numel()
    torch.testing.assert_close(real.logits, masked.logits)
