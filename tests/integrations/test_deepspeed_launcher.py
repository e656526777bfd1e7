"""Two data-parallel CPU processes through DeepSpeed's own ``deepspeed`` launcher (gloo), running ds_worker.py.

* one node: ``deepspeed --num_gpus 2 ds_worker.py`` (on CPU, --num_gpus sets the processes per node);
* two "nodes" on this machine: two launcher invocations started together, each with
  ``--hostfile H --num_nodes 2 --node_rank 0|1 --master_addr 127.0.0.1 --master_port P --no_ssh`` and one process
  per node (the hostfile lists two hosts with ``slots=1``; with --no_ssh nothing connects to them).

Each rank writes a JSON report; the tests assert that data-parallel ranks drew different token indices, that the
forward really used them, and that the layer-token counters (all-reduced over data-parallel ranks) agree and equal
the hand count for the whole world. Every launcher call has a timeout, so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netutil import free_port

pytest.importorskip("deepspeed")

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ds_worker.py"
ROOT = HERE.parents[1]
TIMEOUT = 150  # seconds per launch; a normal run takes ~15 s

STEPS, GAS, MB, SEQ, L = 3, 2, 2, 32, 4
KEPT = [8, 8, 16]  # fixed_linear: min 8, max 32, require_steps 6, seq_per_step 8 (ds_worker.config)
WORLD = 2


def launcher() -> list[str]:
    """The ``deepspeed`` console script of this environment (its entry point when the script is missing)."""
    script = Path(sys.executable).with_name("deepspeed")
    if script.is_file():
        return [sys.executable, str(script)]
    found = shutil.which("deepspeed")
    if found:
        return [sys.executable, found]
    return [sys.executable, "-c", "import sys; from deepspeed.launcher.runner import main; sys.exit(main())"]


def launch_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "CROSS_RANK", "CROSS_SIZE", "CUDA_VISIBLE_DEVICES") and not k.startswith("WANDB_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"  # two or four processes on a 2-core CI runner
    env["WANDB_MODE"] = "disabled"
    return env


def start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as fh:
        # a new session, so a timeout can stop the launcher together with the ranks it spawned
        return subprocess.Popen([*launcher(), *args], cwd=ROOT, env=launch_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    failures = []
    for proc, log in procs:
        try:
            rc = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            failures.append((rc, log))
    if failures:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)  # the launcher and its ranks, all started by this test
                proc.wait()
        details = "\n\n".join(f"exit {rc}, log {log}:\n{log.read_text()[-4000:]}" for rc, log in failures)
        pytest.fail(f"deepspeed launcher failed:\n{details}")


def reports(out: Path) -> list[dict]:
    files = sorted(out.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(WORLD)], files
    return [json.loads(f.read_text()) for f in files]


def check(results: list[dict]) -> None:
    assert [r["rank"] for r in results] == list(range(WORLD))
    assert {r["world_size"] for r in results} == {WORLD}
    assert {r["dp_world_size"] for r in results} == {WORLD}
    assert sorted(r["data_parallel_rank"] for r in results) == list(range(WORLD))

    # different data-parallel ranks drop different tokens, and the forward used exactly the reported indices
    assert len({r["seed"] for r in results}) == WORLD
    assert results[0]["indices_step0"] != results[1]["indices_step0"]
    for r in results:
        assert r["checks"] == {"forward_used_indices": True}, r["checks"]
        assert len(r["indices_step0"]) == MB and all(len(row) == KEPT[0] for row in r["indices_step0"])
        assert r["kept_seen"] == [k for k in KEPT for _ in range(GAS)]

    # the counters are all-reduced over data-parallel ranks: identical everywhere, and the world's total
    samples = STEPS * GAS * MB * WORLD
    consumed = sum(GAS * MB * WORLD * (2 * SEQ + 2 * k) for k in KEPT)
    expected = {"step": STEPS, "consumed_layer_tokens": consumed, "baseline_layer_tokens": samples * L * SEQ,
                "consumed_samples": samples, "consumed_tokens": samples * SEQ}
    for r in results:
        assert r["schedule"] == expected
        assert r["global_steps"] == STEPS

    # data parallelism itself worked: different data per rank, the same weights after the steps
    assert results[0]["losses"] != results[1]["losses"]
    assert results[0]["weights"] == results[1]["weights"]
    assert results[0]["weights_sum"] == results[1]["weights_sum"]


def worker_args(out: Path) -> list[str]:
    return [str(WORKER), "--out", str(out), "--steps", str(STEPS), "--gas", str(GAS)]


def test_two_processes_one_node(tmp_path) -> None:
    out, log = tmp_path / "out", tmp_path / "launcher.log"
    port = free_port()
    proc = start(["--hostfile", str(tmp_path / "no-hostfile"), "--num_gpus", str(WORLD),
                  "--master_port", str(port), *worker_args(out)], log)
    wait_all([(proc, log)])
    check(reports(out))
    # DeepSpeed's CPU allreduce buffers (69 MB per rank) are not left behind in /dev/shm
    if Path("/dev/shm").is_dir():
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_two_nodes_on_one_machine(tmp_path) -> None:
    out = tmp_path / "out"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = []
    for node in range(2):
        log = tmp_path / f"node{node}.log"
        procs.append((start(["--hostfile", str(hostfile), "--num_nodes", "2", "--node_rank", str(node),
                             "--master_addr", "127.0.0.1", "--master_port", port, "--no_ssh",
                             *worker_args(out)], log), log))
    wait_all(procs)
    check(reports(out))
    logs = [log.read_text() for _, log in procs]
    assert "nnodes=2" in logs[0] and "node_rank=1" in logs[1]
