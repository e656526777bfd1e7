"""The megatron-core entry points run end to end on CPU (one process), with and without random-LTD, and resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--eval-interval", "2", "--eval-iters", "1", "--no-progress"]


def _start(script: str, config: str, tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", RANDOM_LTD_CACHE=str(tmp_path / "cache"))
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "launch" / script), "--deepspeed_config", str(ROOT / "configs" / config),
           *TINY, "--results", str(out), *extra]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def _run(script: str, config: str, tmp_path: Path, name: str, *extra: str) -> dict:
    proc = _start(script, config, tmp_path, name, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_gpt_random_ltd_baseline_and_resume(tmp_path):
    full = _run("pretrain_gpt.py", "tiny_gpt_cpu.json", tmp_path, "full", "--train-iters", "4")
    assert full["steps"] == 4 and full["saved_percent"] > 30  # kept 16 of 32 on 6 of 8 layers
    base = _run("pretrain_gpt.py", "tiny_gpt_cpu.json", tmp_path, "base", "--train-iters", "2", "--baseline")
    assert base["saved_percent"] == 0 and base["consumed_layer_tokens"] == 2 * 2 * 32 * 8

    ckpt = str(tmp_path / "ckpt")
    _run("pretrain_gpt.py", "tiny_gpt_cpu.json", tmp_path, "first", "--train-iters", "2", "--save", ckpt)
    resumed = _run("pretrain_gpt.py", "tiny_gpt_cpu.json", tmp_path, "resumed", "--train-iters", "4",
                   "--load", ckpt)
    assert resumed["steps"] == 4
    assert resumed["consumed_layer_tokens"] == full["consumed_layer_tokens"]
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], abs=1e-6)


def test_bert_runs_with_padding(tmp_path):
    res = _run("pretrain_bert.py", "tiny_bert_cpu.json", tmp_path, "bert", "--train-iters", "2")
    assert res["steps"] == 2 and res["saved_percent"] > 30
    assert res["final_val_loss"] == res["final_val_loss"]  # not NaN


def _refused(tmp_path: Path, *extra: str) -> str:
    proc = _start("pretrain_gpt.py", "tiny_gpt_cpu.json", tmp_path, "refused", "--train-iters", "1", *extra)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert not (tmp_path / "refused.json").exists()  # refused before training
    return proc.stderr


def test_load_without_a_checkpoint_is_an_error(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for where in (missing, empty):
        err = _refused(tmp_path, "--load", str(where), "--save", str(where))
        assert f"--load {where}: no checkpoint to resume from" in err and "--allow-fresh-start" in err
    assert not missing.exists() and list(empty.iterdir()) == []

    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "latest").write_text("global_step9")
    err = _refused(tmp_path, "--load", str(dangling), "--allow-fresh-start")
    assert "'global_step9'" in err and "does not exist" in err and "AssertionError" not in err

    fresh = _run("pretrain_gpt.py", "tiny_gpt_cpu.json", tmp_path, "fresh", "--train-iters", "1", "--load",
                 str(empty), "--save", str(empty), "--allow-fresh-start")
    assert fresh["steps"] == 1 and (empty / "latest").read_text() == "global_step1"

    # a fresh run into a directory that already holds checkpoints would overwrite them: refused
    err = _refused(tmp_path, "--save", str(empty))
    assert "already holds checkpoints" in err and f"--load {empty}" in err
    assert sorted(p.name for p in empty.iterdir()) == ["global_step1", "latest"]


def test_random_ltd_resumes_from_a_baseline_checkpoint(tmp_path):
    """The baseline's iteration LR scheduler state does not crash LayerToken LR (KeyError before); the schedule
    continues at the checkpoint's step with the layer-tokens the baseline really consumed."""
    ckpt = str(tmp_path / "ckpt")
    _run("pretrain_gpt.py", "tiny_gpt_cpu.json", tmp_path, "base", "--train-iters", "2", "--baseline", "--save", ckpt)
    resumed = _run("pretrain_gpt.py", "tiny_gpt_cpu.json", tmp_path, "rltd", "--train-iters", "4", "--load", ckpt)
    baseline_step, rltd_step = 2 * 32 * 8, 2 * (2 * 32 + 6 * 16)  # batch 2: 8 full layers; 2 full + 6 keeping 16
    assert resumed["steps"] == 4
    assert resumed["consumed_layer_tokens"] == 2 * baseline_step + 2 * rltd_step
    assert resumed["final_val_loss"] == resumed["final_val_loss"]  # not NaN


def _short_lr_config(tmp_path: Path, **lr_block) -> Path:
    """tiny_gpt_cpu.json planned for the tiny shapes: kept 16 -> 32 over 4 steps, LayerToken LR over 2,000."""
    ds = json.loads((ROOT / "configs" / "tiny_gpt_cpu.json").read_text())
    block = ds["data_efficiency"]["data_routing"]["random_ltd"]
    block["random_ltd_schedule"].update(max_value=32, schedule_config={"require_steps": 4, "seq_per_step": 8})
    block["layer_token_lr_schedule"].update(total_layer_tokens=2000, warmup_layer_tokens=700, **lr_block)
    path = tmp_path / "short_lr.json"
    path.write_text(json.dumps(ds))
    return path


def test_baseline_replays_the_layer_token_lr_of_a_random_ltd_run(tmp_path):
    """--lr-schedule-of: the baseline runs every step at the LR the random-LTD run had (its LayerToken LR at the
    layer-tokens it had consumed), not at its own iteration scheduler's, and drops nothing."""
    cfg = _short_lr_config(tmp_path)
    steps = ["--train-iters", "6", "--eval-interval", "1"]
    rltd = _run("pretrain_gpt.py", str(cfg), tmp_path, "rltd", *steps)
    control = _run("pretrain_gpt.py", str(cfg), tmp_path, "control", *steps, "--baseline", "--lr-schedule-of",
                   str(cfg))
    plain = _run("pretrain_gpt.py", str(cfg), tmp_path, "plain", *steps, "--baseline")

    # the reference: Appendix C's formula on the layer-tokens the random-LTD run really consumed before each step
    before = [0] + [c["layer_tokens"] for c in rltd["curve"][:-1]]
    expected = [0.002 * c / 700 if c < 700 else max(0.0, 0.002 * (1 - (c - 700) / 1300)) for c in before]
    assert [c["lr"] for c in rltd["curve"]] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert [c["lr"] for c in control["curve"]] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert len(set(expected)) == 6  # warmup and decay both inside the 6 steps
    assert [c["lr"] for c in plain["curve"]] != pytest.approx(expected)  # the iteration scheduler differs
    assert control["consumed_layer_tokens"] == 6 * 2 * 32 * 8 and control["saved_percent"] == 0
    assert rltd["saved_percent"] > 0


def test_lr_schedule_of_is_refused_without_a_random_ltd_lr_schedule(tmp_path):
    cfg = _short_lr_config(tmp_path)
    assert "only with --baseline" in _refused(tmp_path, "--lr-schedule-of", str(cfg))
    assert "no such file" in _refused(tmp_path, "--baseline", "--lr-schedule-of", str(tmp_path / "missing.json"))
    off = _short_lr_config(tmp_path, enabled=False)
    err = _refused(tmp_path, "--baseline", "--lr-schedule-of", str(off))
    assert f"--lr-schedule-of {off}: needs random-LTD and its layer_token_lr_schedule enabled" in err
    assert "LayerToken LR off" in err
