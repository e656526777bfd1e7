"""Megatron-DeepSpeed configs have no optimizer block (Megatron builds the optimizer): our entry points build one from
Megatron-style arguments. fp16 where the accelerator has none is refused with a clear message."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from launch import megatron_train  # noqa: E402


def parse(config: dict, tmp_path: Path, *argv: str) -> argparse.Namespace:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    p = argparse.ArgumentParser()
    megatron_train.add_common_args(p, num_layers=8, hidden=32, heads=2, seq=32)
    return p.parse_args(["--deepspeed_config", str(path), *argv])


def megatron_deepspeed_config() -> dict:
    """configs/tiny_gpt_cpu.json as Megatron-DeepSpeed writes it: no optimizer, scheduler or clipping."""
    cfg = json.loads((ROOT / "configs" / "tiny_gpt_cpu.json").read_text())
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        cfg.pop(key, None)
    cfg["data_efficiency"]["data_routing"]["random_ltd"].pop("layer_token_lr_schedule", None)
    return cfg


def test_optimizer_and_scheduler_built_from_megatron_args(tmp_path) -> None:
    args = parse(megatron_deepspeed_config(), tmp_path, "--lr", "3e-4", "--min-lr", "3e-5", "--weight-decay", "0.1",
                 "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--clip-grad", "0.5", "--lr-warmup-iters", "5",
                 "--train-iters", "40")
    ds = megatron_train.deepspeed_config(args)
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.1, "torch_adam": True}}
    assert ds["gradient_clipping"] == 0.5
    assert ds["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 40, "warmup_num_steps": 5, "warmup_type": "linear", "cos_min_ratio": pytest.approx(0.1),
        "warmup_min_ratio": 0.0}}
    linear = megatron_train.deepspeed_config(parse(megatron_deepspeed_config(), tmp_path, "--lr", "1e-3",
                                                   "--lr-decay-style", "linear"))
    assert linear["scheduler"]["type"] == "WarmupDecayLR" and linear["scheduler"]["params"]["warmup_max_lr"] == 1e-3


def test_layer_token_lr_takes_min_lr(tmp_path) -> None:
    cfg = megatron_deepspeed_config()
    cfg["data_efficiency"]["data_routing"]["random_ltd"]["layer_token_lr_schedule"] = {
        "enabled": True, "total_layer_tokens": 10**6, "warmup_layer_tokens": 10**4, "warmup_type": "linear"}
    ds = megatron_train.deepspeed_config(parse(cfg, tmp_path, "--lr", "1e-3", "--min-lr", "1e-4"))
    assert "scheduler" not in ds  # LayerToken LR is the schedule
    assert ds["data_efficiency"]["data_routing"]["random_ltd"]["layer_token_lr_schedule"]["min_lr"] == 1e-4


def test_missing_lr_and_conflicts_are_clear(tmp_path) -> None:
    with pytest.raises(SystemExit, match="no optimizer block: pass --lr"):
        megatron_train.deepspeed_config(parse(megatron_deepspeed_config(), tmp_path))
    with_block = json.loads((ROOT / "configs" / "tiny_gpt_cpu.json").read_text())
    with pytest.raises(SystemExit, match="--lr, --clip-grad: the DeepSpeed config .* has an optimizer block"):
        megatron_train.deepspeed_config(parse(with_block, tmp_path, "--lr", "1e-3", "--clip-grad", "1"))
    assert megatron_train.deepspeed_config(parse(with_block, tmp_path))["optimizer"] == with_block["optimizer"]
    with pytest.raises(SystemExit, match="--min-lr 0.5 must be in"):
        megatron_train.deepspeed_config(parse(megatron_deepspeed_config(), tmp_path, "--lr", "0.1", "--min-lr",
                                              "0.5"))


def test_fp16_without_support_is_refused(tmp_path, monkeypatch) -> None:
    import deepspeed.accelerator

    acc = deepspeed.accelerator.get_accelerator()
    monkeypatch.setattr(acc, "is_fp16_supported", lambda: False)
    cfg = megatron_deepspeed_config()
    cfg["fp16"] = {"enabled": True}
    with pytest.raises(SystemExit, match=r'fp16.enabled: the \w+ accelerator here does not support fp16 training; '
                                         r'set "fp16": \{"enabled": false\}'):
        megatron_train.deepspeed_config(parse(cfg, tmp_path, "--lr", "1e-3"))
    monkeypatch.setattr(acc, "is_fp16_supported", lambda: True)
    assert megatron_train.deepspeed_config(parse(cfg, tmp_path, "--lr", "1e-3"))["fp16"] == {"enabled": True}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pretrain_gpt_trains_a_config_without_optimizer_block(tmp_path) -> None:
    pytest.importorskip("megatron.core")
    from test_pretrain_entry_points import _run

    path = tmp_path / "megatron_ds.json"
    path.write_text(json.dumps(megatron_deepspeed_config()))
    res = _run("pretrain_gpt.py", str(path), tmp_path, "no_opt", "--train-iters", "4", "--lr", "2e-3",
               "--min-lr", "2e-4", "--lr-warmup-iters", "1", "--eval-interval", "4")
    assert res["steps"] == 4 and res["saved_percent"] > 30
    assert res["final_val_loss"] == res["final_val_loss"]  # not NaN
