"""Fault injection on the megatron-core GPT entry point under the ``deepspeed`` launcher: two CPU ranks (gloo),
ZeRO-1 (every rank writes its own optimizer shard), the tiny config.

* a rank killed mid-shard and a rank killed mid-step: the run resumes exactly, and no complete checkpoint is ever
  rewritten or published half-written;
* the launcher killed: the ranks end instead of training on as orphans.

Faults come from tests/launch/fault_runner.py (``RANDOM_LTD_TEST_KILL_AT``), outside the library. Every launch has
a timeout and is killed with its whole process group, so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("deepspeed")
psutil = pytest.importorskip("psutil")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integrations"))
from netutil import free_port  # noqa: E402
from test_deepspeed_launcher import launch_env, launcher  # noqa: E402

RUNNER = HERE / "fault_runner.py"
SCRIPT = ROOT / "launch" / "pretrain_gpt.py"
TIMEOUT = 300  # seconds per launch (a hang fails); one takes ~20 s on an idle 2-core machine
TINY = ["--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--eval-interval", "2", "--eval-iters", "1", "--no-progress"]


def zero1_config(tmp_path: Path) -> Path:
    cfg = json.loads((ROOT / "configs" / "tiny_gpt_cpu.json").read_text())
    cfg["zero_optimization"] = {"stage": 1}
    path = tmp_path / "tiny_gpt_zero1.json"
    path.write_text(json.dumps(cfg))
    return path


def start(tmp_path: Path, name: str, args: list[str], kill_at: str | None = None) -> tuple[subprocess.Popen, Path]:
    env = launch_env()
    env["RANDOM_LTD_CACHE"] = str(tmp_path / "cache")
    env["RANDOM_LTD_TEST_SCRIPT"] = str(SCRIPT)
    if kill_at:
        env["RANDOM_LTD_TEST_KILL_AT"] = kill_at
    log = tmp_path / f"{name}.log"
    cmd = [*launcher(), "--hostfile", str(tmp_path / "no-hostfile"), "--num_gpus", "2", "--master_port",
           str(free_port()), str(RUNNER), "--deepspeed_config", str(zero1_config(tmp_path)), *TINY,
           "--results", str(tmp_path / f"{name}.json"), *args]
    with log.open("w") as fh:
        # a new session: the launcher, its `launch` child and the ranks form one process group to clean up
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started
    except ProcessLookupError:
        pass


def run(tmp_path: Path, name: str, *args: str, kill_at: str | None = None) -> tuple[int, str, dict | None]:
    proc, log = start(tmp_path, name, list(args), kill_at)
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launch {name} timed out:\n{log.read_text()[-4000:]}")
    finally:
        kill_group(proc)  # nothing may outlive the launcher (also on a pytest-timeout)
        proc.wait()
    out = tmp_path / f"{name}.json"
    return rc, log.read_text(), json.loads(out.read_text()) if out.exists() else None


def digest(tag_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(tag_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tag_dir.rglob("*")) if p.is_file()}


def tags(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.is_dir())


@pytest.mark.slow
@pytest.mark.timeout(4 * TIMEOUT + 60)
def test_kill_mid_save_and_mid_step_then_resume_exactly(tmp_path) -> None:
    rc, log, ref = run(tmp_path, "ref", "--train-iters", "6")
    assert rc == 0 and ref is not None, log[-4000:]

    ckpt = tmp_path / "ckpt"
    save = ["--train-iters", "6", "--save", str(ckpt), "--save-interval", "2"]
    # rank 1 dies half-way through writing its ZeRO shard of global_step4 (rank 0 has finished its files)
    rc, log, _ = run(tmp_path, "kill_mid_save", *save, kill_at="save:1:global_step4")
    assert rc != 0 and "killed mid-write" in log, log[-4000:]
    assert (ckpt / "latest").read_text() == "global_step2", "latest must only name a tag every rank finished"
    assert "global_step4" not in tags(ckpt)
    step2 = digest(ckpt / "global_step2")

    # resume; rank 0 dies inside optimizer step 5 (after global_step4 was saved)
    rc, log, _ = run(tmp_path, "kill_mid_step", *save, "--load", str(ckpt), kill_at="step:0:5")
    assert rc != 0 and "killed inside optimizer step 5" in log, log[-4000:]
    assert (ckpt / "latest").read_text() == "global_step4"
    assert tags(ckpt) == ["global_step2", "global_step4"]  # the leftover global_step4.incomplete was replaced
    assert digest(ckpt / "global_step2") == step2
    step4 = digest(ckpt / "global_step4")

    # resume to the end: exactly the uninterrupted run; step 6 is saved once (interval and final save coincide)
    rc, log, res = run(tmp_path, "resume", *save, "--load", str(ckpt))
    assert rc == 0 and res is not None, log[-4000:]
    assert res["steps"] == ref["steps"] == 6
    assert res["consumed_layer_tokens"] == ref["consumed_layer_tokens"]
    assert res["baseline_layer_tokens"] == ref["baseline_layer_tokens"]
    assert res["final_val_loss"] == pytest.approx(ref["final_val_loss"], abs=1e-6)
    assert res["curve"][-1]["train_loss"] == pytest.approx(ref["curve"][-1]["train_loss"], abs=1e-6)
    assert (ckpt / "latest").read_text() == "global_step6"
    assert tags(ckpt) == ["global_step2", "global_step4", "global_step6"]
    assert digest(ckpt / "global_step2") == step2 and digest(ckpt / "global_step4") == step4


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 120)
def test_killing_the_launcher_ends_the_ranks(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    proc, log = start(tmp_path, "orphans", ["--train-iters", "1000000", "--eval-interval", "1000000",
                                            "--save", str(ckpt), "--save-interval", "2"])
    try:
        deadline = time.monotonic() + TIMEOUT - 30
        while not (ckpt / "latest").exists():  # the ranks are training (and checkpointing)
            assert proc.poll() is None, f"launcher exited early:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint written:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "--local_rank" in " ".join(p.cmdline()) and "deepspeed.launcher.launch" not in p.cmdline()]
        assert len(ranks) == 2, ranks
        proc.kill()  # the `deepspeed` command; its `launch` child and the ranks are not told
        proc.wait()
        _, alive = psutil.wait_procs(ranks, timeout=60)
        assert not alive, f"ranks {[p.pid for p in alive]} outlived the launcher:\n{log.read_text()[-3000:]}"
        assert "ending this rank" in log.read_text()
    finally:
        kill_group(proc)


def test_guard_ends_a_process_whose_parent_dies(tmp_path) -> None:
    """PR_SET_PDEATHSIG / watchdog with a plain parent (forced on with RANDOM_LTD_EXIT_WITH_LAUNCHER=1)."""
    armed = tmp_path / "armed"
    child = ("import os, sys, time; sys.path.insert(0, sys.argv[1]);"
             "from random_ltd.integrations.deepspeed.launcher_guard import exit_with_launcher;"
             "tmp = sys.argv[2] + '.tmp'; f = open(tmp, 'w'); f.write(repr(exit_with_launcher(poll_s=0.1)));"
             "f.close(); os.replace(tmp, sys.argv[2]); time.sleep(600)")
    parent = ("import subprocess, sys, time;"
              "p = subprocess.Popen([sys.executable, '-c', *sys.argv[1:]]);"
              "print(p.pid, flush=True); time.sleep(600)")
    env = dict(os.environ, RANDOM_LTD_EXIT_WITH_LAUNCHER="1", OMP_NUM_THREADS="1")
    middle = subprocess.Popen([sys.executable, "-c", parent, child, str(ROOT), str(armed)], env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        grandchild = psutil.Process(int(middle.stdout.readline()))
        deadline = time.monotonic() + 120
        while not armed.exists() and grandchild.is_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert armed.read_text() == f"[{middle.pid}]"  # armed, watching its parent
        middle.kill()
        middle.wait()
        _, alive = psutil.wait_procs([grandchild], timeout=60)
        assert not alive, "the child outlived its parent"
    finally:
        kill_group(middle)


def test_guard_is_off_outside_a_launcher(monkeypatch) -> None:
    from random_ltd.integrations.deepspeed import launcher_guard

    monkeypatch.setattr(launcher_guard, "_armed", None)
    monkeypatch.delenv(launcher_guard.ENV_VAR, raising=False)
    assert launcher_guard.exit_with_launcher() == []  # pytest's parent is not deepspeed's launcher
    monkeypatch.setattr(launcher_guard, "_armed", None)
    monkeypatch.setenv(launcher_guard.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="RANDOM_LTD_EXIT_WITH_LAUNCHER must be 0, 1 or auto"):
        launcher_guard.exit_with_launcher()
