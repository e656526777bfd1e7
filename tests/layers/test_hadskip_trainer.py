"""HadSkip three-stage trainer: KD losses, what each stage trains, save/resume, stages run alone from checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from test_hadskip import ToyHadSkipModel

from random_ltd.config import ConfigError, HadSkipConfig
from random_ltd.hadskip_trainer import HadSkipTrainer, evaluate, kd_losses
from random_ltd.layers.hadskip import set_gating

L = 4


def _batches(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 50, (8, 6), generator=g)
    mask = torch.ones(8, 6, dtype=torch.long)
    mask[0, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] % 3)}


def _config(**over) -> HadSkipConfig:
    base = dict(budget=2, num_layers=L, homotopic={"steps_per_stage": 2},
                stages={"stage1_steps": 4, "stage2_steps": 4, "stage3_steps": 8, "stage1_lr": 1e-2,
                        "stage2_lr": 1e-2, "stage3_lr": 1e-2})
    base.update(over)
    return HadSkipConfig.from_file(base)


def _model(seed=0) -> ToyHadSkipModel:
    torch.manual_seed(seed)
    return ToyHadSkipModel(layers=L)


def test_kd_losses_zero_for_identical_models_and_positive_otherwise():
    model = _model().train()
    teacher = copy.deepcopy(model)
    set_gating(model, False)
    set_gating(teacher, False)
    b = _batches(0)
    s_out, t_out = model(b["input_ids"], b["attention_mask"]), teacher(b["input_ids"], b["attention_mask"])
    for name, value in kd_losses(s_out, t_out).items():
        assert value.item() == 0.0, name
    with torch.no_grad():
        model.embed.weight.add_(0.1)
    s_out = model(b["input_ids"], b["attention_mask"])
    for name, value in kd_losses(s_out, t_out).items():
        assert value.item() > 0.0, name


def test_kd_losses_flow_gradients():
    model, teacher = _model(), _model(1)
    set_gating(teacher, False)
    b = _batches(0)
    out = model(b["input_ids"], b["attention_mask"])
    losses = kd_losses(out, teacher(b["input_ids"], b["attention_mask"]))
    sum(losses.values()).backward()
    assert model.embed.weight.grad.abs().sum() > 0


def _params(model, gates: bool):
    return {n: p.detach().clone() for n, p in model.named_parameters() if (".gate." in n) == gates}


def test_stages_train_the_right_parameters(tmp_path):
    model = _model()
    trainer = HadSkipTrainer(model, _config())
    gates0, backbone0 = _params(model, True), _params(model, False)
    logs = trainer.train_stage(1, _batches, checkpoint_dir=tmp_path)
    assert len(logs) == 4 and "mean_layers" not in logs[0]
    assert all(torch.equal(gates0[n], p) for n, p in _params(model, True).items())
    assert any(not torch.equal(backbone0[n], p) for n, p in _params(model, False).items())

    backbone1 = _params(model, False)
    logs = trainer.train_stage(2, _batches, checkpoint_dir=tmp_path)
    assert all(torch.equal(backbone1[n], p) for n, p in _params(model, False).items())
    assert any(not torch.equal(gates0[n], p) for n, p in _params(model, True).items())
    assert all("budget" not in e for e in logs)

    logs = trainer.train_stage(3, _batches, checkpoint_dir=tmp_path)
    assert [e["budget"] for e in logs] == [4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0]
    assert all(k in logs[0] for k in ("kd_p", "kd_h", "kd_att", "kd_emb", "budget_term"))
    assert logs[0]["kd_emb"] == 0.0  # student starts from the teacher's weights
    assert any(not torch.equal(backbone1[n], p) for n, p in _params(model, False).items())
    for stage in (1, 2, 3):
        assert HadSkipTrainer.load_checkpoint(tmp_path / f"stage{stage}.pt")["complete"]


def test_stage_runs_alone_and_resume_is_exact(tmp_path):
    cfg = _config()
    # stages 1 and 2 once, then stage 3 uninterrupted from the stage-2 checkpoint
    trainer = HadSkipTrainer(_model(), cfg)
    trainer.train_stage(1, _batches, checkpoint_dir=tmp_path)
    trainer.train_stage(2, _batches, checkpoint_dir=tmp_path)
    full_dir = tmp_path / "full"
    torch.manual_seed(7)
    a = HadSkipTrainer(_model(5), cfg)  # fresh object: weights come only from the checkpoints
    logs_a = a.train_stage(3, _batches, checkpoint_dir=full_dir, init_from=tmp_path / "stage2.pt")
    # the teacher must be the stage-1 model: build it explicitly from the stage-1 checkpoint
    # (full_dir has no stage1.pt, so pass it)
    part_dir = tmp_path / "part"
    torch.manual_seed(7)
    b = HadSkipTrainer(_model(5), cfg)
    b.make_teacher(tmp_path / "stage1.pt")
    logs_b1 = b.train_stage(3, _batches, checkpoint_dir=part_dir, init_from=tmp_path / "stage2.pt", stop_after=3,
                            save_every=1)
    assert not HadSkipTrainer.load_checkpoint(part_dir / "stage3.pt")["complete"]
    torch.manual_seed(123)  # a different RNG state: the checkpoint's must be restored
    c = HadSkipTrainer(_model(9), cfg)
    c.make_teacher(tmp_path / "stage1.pt")
    logs_b2 = c.train_stage(3, _batches, checkpoint_dir=part_dir)
    assert [e["step"] for e in logs_b1 + logs_b2] == list(range(8))
    assert len(logs_a) == 8
    # a's teacher: the model itself at stage-3 start (no stage1.pt in full_dir) == stage-2 weights, gates off;
    # stage 2 did not change the backbone, so it equals the stage-1 teacher: identical runs
    assert [e["loss"] for e in logs_a] == [e["loss"] for e in logs_b1 + logs_b2]
    for (n, p), (_, q) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        assert torch.equal(p, q), n


def test_homotopy_disabled_uses_target_budget(tmp_path):
    trainer = HadSkipTrainer(_model(), _config(homotopic={"enabled": False}))
    logs = trainer.train_stage(3, _batches, steps=3)
    assert [e["budget"] for e in logs] == [2.0, 2.0, 2.0]


def test_convergence_mode(tmp_path):
    cfg = _config(beta=100.0, homotopic={"step_on": "convergence", "tolerance": 10.0, "patience": 1})
    logs = HadSkipTrainer(_model(), cfg).train_stage(3, _batches, steps=4)
    assert [e["budget"] for e in logs] == [4.0, 3.0, 2.0, 2.0]


def test_evaluate_reports_layers_and_usage():
    model = _model()
    batches = [_batches(i) for i in range(3)]
    full = evaluate(model, batches, gating=False)
    assert full["mean_layers"] == L and full["layer_calls"] == 3 * 8 * L
    gated = evaluate(model, batches)
    assert len(gated["layers_per_sequence"]) == 24 and len(gated["layer_usage"]) == L
    assert gated["layer_calls"] == sum(gated["layers_per_sequence"])
    masked = evaluate(model, batches, real_skip=False)
    assert masked["accuracy"] == gated["accuracy"] and masked["layers_per_sequence"] == gated["layers_per_sequence"]


def test_errors():
    with pytest.raises(ConfigError, match="hadskip.budget"):
        _config(budget=9)
    with pytest.raises(ValueError, match="num_layers"):
        HadSkipTrainer(_model(), HadSkipConfig(budget=2, num_layers=6))
    with pytest.raises(ValueError, match="no HadSkipLayer"):
        HadSkipTrainer(torch.nn.Linear(2, 2), HadSkipConfig(budget=2))
    with pytest.raises(ValueError, match="stage must be"):
        HadSkipTrainer(_model(), _config()).train_stage(4, _batches)
    with pytest.raises(TypeError, match="HadSkipConfig"):
        HadSkipTrainer(_model(), {"budget": 2})


def test_stage1_warmup_and_linear_decay_schedule_and_resume(tmp_path):
    """Stage 1's LR ramps linearly over stage1_warmup_steps, decays linearly to 0 at stage1_steps, and a resumed
    stage continues the same schedule (the factor is a function of the step, not of the call)."""
    stages = {"stage1_steps": 6, "stage2_steps": 2, "stage3_steps": 2, "stage1_lr": 1e-2, "stage2_lr": 1e-2,
              "stage3_lr": 1e-2, "stage1_warmup_steps": 2, "stage1_decay": "linear"}
    cfg = _config(stages=stages)
    logs = HadSkipTrainer(_model(), cfg).train_stage(1, _batches)
    assert [round(e["lr"] / 1e-2, 6) for e in logs] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    part = HadSkipTrainer(_model(), cfg)
    first = part.train_stage(1, _batches, checkpoint_dir=tmp_path, stop_after=3)
    rest = HadSkipTrainer(part.model, cfg).train_stage(1, _batches, checkpoint_dir=tmp_path)
    assert [e["lr"] for e in first + rest] == [e["lr"] for e in logs]
    assert [e["loss"] for e in first + rest] == pytest.approx([e["loss"] for e in logs], rel=1e-6)
    # stages 2 and 3 and the default stage 1 keep a constant LR
    flat = HadSkipTrainer(_model(), _config())
    assert {e["lr"] for e in flat.train_stage(1, _batches)} == {1e-2}
    assert {e["lr"] for e in flat.train_stage(2, _batches)} == {1e-2}


def test_stage1_warmup_longer_than_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="stage1_warmup_steps"):
        _config(stages={"stage1_steps": 4, "stage1_warmup_steps": 5})
