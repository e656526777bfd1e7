"""python -m random_ltd plan / info."""

from __future__ import annotations

import json
import math

import pytest

from random_ltd import RandomLTDConfig
from random_ltd.cli import main
from random_ltd.schedules import total_saving


def test_plan_prints_schedule_and_saving(capsys, tmp_path):
    assert main(["plan", "--config", "configs/tiny_gpt_cpu.json", "--steps", "200", "--batch", "16",
                 "--warmup-steps", "20", "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    from random_ltd import RandomLTDConfig

    saving = 100 * total_saving(RandomLTDConfig.from_deepspeed("configs/tiny_gpt_cpu.json"), 200, 16)
    assert f"{saving:.1f}% saved" in out
    assert "LayerToken LR" in out and "iteration LR" in out
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_plan_reports_invalid_config_with_key_path(capsys, tmp_path):
    cfg = json.load(open("configs/tiny_gpt_cpu.json"))
    cfg["data_efficiency"]["data_routing"]["random_ltd"]["random_ltd_schedule"]["min_value"] = 4096
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    assert main(["plan", "--config", str(path), "--steps", "10", "--batch", "2"]) == 2
    err = capsys.readouterr().err
    assert "data_efficiency.data_routing.random_ltd.random_ltd_schedule.min_value" in err


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu: selected backend" in out and "torch" in out


def _plan_rows(out: str) -> dict[int, tuple[int, float]]:
    """step -> (kept, iteration LR) from the printed table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 7 and parts[0].isdigit():
            rows[int(parts[0])] = (int(parts[1]), float(parts[6]))
    return rows


def _ds_config(tmp_path, **top) -> str:
    cfg = json.load(open("configs/tiny_gpt_cpu.json"))
    cfg["data_efficiency"]["data_routing"]["random_ltd"].pop("layer_token_lr_schedule", None)
    cfg.pop("scheduler", None)
    cfg.update(top)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_plan_needs_only_the_config(capsys, tmp_path):
    """Batch from train_batch_size, peak LR from optimizer.params.lr, warmup and length from the scheduler block."""
    path = _ds_config(tmp_path, train_batch_size=16, scheduler={"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0, "warmup_num_steps": 20, "total_num_steps": 200, "warmup_type": "linear"}})
    assert main(["plan", "--config", path, "--rows", "1000"]) == 0
    out = capsys.readouterr().out
    assert "batch 16, 200 steps" in out
    assert ("inputs: batch from train_batch_size, lr from optimizer.params.lr, warmup_steps from "
            "scheduler.params.warmup_num_steps, steps from scheduler.params.total_num_steps") in out
    rows = _plan_rows(out)
    assert len(rows) == 200
    peak = 0.002  # configs/tiny_gpt_cpu.json optimizer.params.lr
    assert rows[0][1] == 0.0 and rows[10][1] == pytest.approx(peak / 2, rel=1e-3)  # linear warmup over 20 steps
    assert rows[20][1] == pytest.approx(peak, rel=1e-3) and rows[199][1] < peak / 100  # then linear decay
    saving = 100 * total_saving(RandomLTDConfig.from_deepspeed(path), 200, 16)
    assert f"{saving:.1f}% saved" in out
    assert "counts the layer-tokens that really ran" in out and "data_efficiency.seed 1234" in out


def test_plan_flags_override_the_config(capsys, tmp_path):
    path = _ds_config(tmp_path, train_batch_size=16, scheduler={"type": "WarmupLR", "params": {
        "warmup_min_lr": 0, "warmup_max_lr": 0.004, "warmup_num_steps": 20}})
    assert main(["plan", "--config", path, "--batch", "4", "--steps", "30", "--lr", "1.0", "--warmup-steps", "10",
                 "--rows", "1000"]) == 0
    out = capsys.readouterr().out
    assert "batch 4, 30 steps" in out
    assert "batch from flag, lr from flag, warmup_steps from flag, steps from flag" in out
    rows = _plan_rows(out)
    assert rows[5][1] == pytest.approx(math.log(6) / math.log(10), rel=1e-3)  # WarmupLR's default log warmup
    assert rows[10][1] == rows[29][1] == 1.0  # WarmupLR: constant after warmup


def test_plan_warmup_without_layer_token_lr_is_not_ignored(capsys, tmp_path):
    """--warmup-steps shapes the iteration LR even when the config has no LayerToken LR block."""
    path = _ds_config(tmp_path, train_batch_size=16)
    assert main(["plan", "--config", path, "--steps", "40", "--warmup-steps", "10", "--rows", "1000"]) == 0
    rows = _plan_rows(capsys.readouterr().out)
    assert rows[0][1] == 0.0 and rows[5][1] == pytest.approx(0.001) and rows[10][1] == rows[39][1] == 0.002
    # without a scheduler block the length defaults to the MSLG growth length
    assert main(["plan", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "steps from random_ltd_schedule.schedule_config.require_steps" in out


def test_plan_without_a_batch_says_which_flag(capsys, tmp_path):
    path = _ds_config(tmp_path)
    cfg = json.load(open(path))
    del cfg["train_batch_size"]
    open(path, "w").write(json.dumps(cfg))
    assert main(["plan", "--config", path, "--steps", "10"]) == 2
    assert "--batch (or train_batch_size in the config)" in capsys.readouterr().err
