"""python -m random_ltd plan / info."""

from __future__ import annotations

import json

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
