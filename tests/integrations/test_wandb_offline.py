"""Random-LTD metrics through DeepSpeed's monitor blocks: W&B (offline, no network) and CSV.

The W&B run file is parsed directly (wandb 0.31 ships no reader): a 7-byte header (":W&B", 2-byte magic, version),
then 32 KiB blocks of records framed as (crc32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle,
4 last), each record a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import random_ltd
from random_ltd.monitor import METRIC_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "layers"))
from tiny_models import TinyGPT  # noqa: E402

pytest.importorskip("deepspeed")

pytestmark = [
    pytest.mark.usefixtures("dist_env"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

L, SEQ, MB, STEPS = 4, 32, 4, 4
KEPT = [8, 8, 16, 16]  # fixed_linear: min 8, max 32, require_steps 6, seq_per_step 8


def config(**monitors) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MB, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": {
            "enabled": True, "total_layer_num": L, "model_mask_name": "attention_mask",
            "hidden_state_order": "batch_seq_dim",
            "random_ltd_schedule": {"min_value": 8, "max_value": SEQ,
                                    "schedule_config": {"require_steps": 6, "seq_per_step": 8}}}}},
        **monitors,
    }


def run(cfg: dict) -> object:
    torch.manual_seed(0)
    model = TinyGPT(layers=L, seq=SEQ)
    engine, *_ = random_ltd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 64, (MB, SEQ), generator=g)
        loss = engine(tokens, tokens)
        engine.backward(loss)
        engine.step()
    return engine


def expected_consumed(step: int) -> int:
    """Layer-tokens after ``step`` + 1 steps: 2 full layers, 2 dropping layers."""
    return sum(MB * (2 * SEQ + 2 * k) for k in KEPT[:step + 1])


# --------------------------------------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------------------------------------

_HEADER = 7
_BLOCK = 32 * 1024
_RECORD_HEADER = 7  # crc32 uint32, length uint16, type uint8
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """Every ``Record`` in an offline ``run-*.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    payloads, pending, pos = [], None, _HEADER
    while pos + _RECORD_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD_HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _RECORD_HEADER])
        if length == 0 and kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + _RECORD_HEADER:pos + _RECORD_HEADER + length]
        assert len(chunk) == length, f"truncated record at offset {pos}"
        pos += _RECORD_HEADER + length
        if kind == _FULL:
            assert pending is None
            payloads.append(chunk)
        elif kind == _FIRST:
            assert pending is None
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            payloads.append(pending + chunk)
            pending = None
        else:
            raise AssertionError(f"bad record type {kind} at offset {pos}")
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def read_finished_run(path: Path, timeout: float = 60.0) -> list:
    """The records of a finished run's file, once its writer has flushed everything up to the exit record.

    ``wandb.finish()`` only *informs* the wandb-core service that the run is over; the service closes the stream
    (and flushes the file's buffered tail, history included) asynchronously. ``wandb.teardown()`` waits for the
    service process to exit; the poll below is a second guard with a deadline, so a slow machine cannot make the
    test read a half-written file.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_wandb_records(path)
        except AssertionError:  # cut in the middle of a record: still being written
            if time.monotonic() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history_rows(records: list) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.fixture
def wandb_env(tmp_path):
    """WANDB_DIR in tmp, no WANDB_MODE, no API key and no netrc login; restored afterwards."""
    keys = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_SILENT", "WANDB_CONSOLE", "NETRC")
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # a W&B singleton set up by an earlier test would keep that test's WANDB_DIR
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    os.environ["WANDB_DIR"] = str(tmp_path)
    os.environ["NETRC"] = str(tmp_path / "no-netrc")  # a developer's `wandb login` must not make this run online
    os.environ["WANDB_SILENT"] = "true"
    os.environ["WANDB_CONSOLE"] = "off"
    yield tmp_path
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_wandb_offline_run_holds_random_ltd_metrics(wandb_env) -> None:
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("wandb.proto.wandb_internal_pb2")
    assert "WANDB_MODE" not in os.environ
    try:
        engine = run(config(wandb={"enabled": True, "project": "random-ltd-test"}))
        assert os.environ.get("WANDB_MODE") == "offline"  # set by random_ltd.initialize: no API key configured
        assert wandb.run is not None and wandb.run.offline
        global_samples = engine.global_samples
    finally:
        wandb.finish()
        wandb.teardown()  # finish() does not wait for the service to flush the run file; teardown does

    files = sorted(wandb_env.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = read_finished_run(files[0])
    assert any(r.WhichOneof("record_type") == "exit" for r in records), "the run file never got its exit record"
    rows = history_rows(records)
    ours = [r for r in rows if any(k in r for k in METRIC_KEYS)]
    if len(ours) != STEPS:  # one row per optimizer step, none dropped by W&B's monotonic-step rule
        kinds = Counter(r.WhichOneof("record_type") for r in records)
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(wandb_env.glob("wandb/*.log")))
        pytest.fail(f"{len(ours)} of {STEPS} random_ltd rows; file {files[0].stat().st_size} bytes, records "
                    f"{dict(kinds)}, history rows {rows}\n{logs}")
    for step, row in enumerate(ours):
        assert set(METRIC_KEYS) <= set(row), row
        assert row["random_ltd/kept_length"] == KEPT[step]
        assert row["random_ltd/consumed_layer_tokens"] == expected_consumed(step)
        assert row["random_ltd/baseline_layer_tokens"] == (step + 1) * MB * L * SEQ
        assert row["random_ltd/saved_percent"] == pytest.approx(
            100 * (1 - expected_consumed(step) / ((step + 1) * MB * L * SEQ)))
        assert row["_step"] == (step + 1) * MB  # DeepSpeed's x-axis: global samples
    assert ours[-1]["_step"] == global_samples
    # DeepSpeed's own events still arrive on the same axis
    assert any("Train/Samples/lr" in r for r in rows)


# --------------------------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------------------------


def test_csv_monitor_writes_one_file_per_metric(tmp_path) -> None:
    run(config(csv_monitor={"enabled": True, "output_path": str(tmp_path), "job_name": "job"}))
    job = tmp_path / "job"
    for key in METRIC_KEYS:
        path = job / (key.replace("/", "_") + ".csv")
        assert path.is_file(), sorted(p.name for p in job.iterdir())
        with path.open() as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["step", key.split("/")[-1]]
        assert [int(r[0]) for r in rows[1:]] == [(t + 1) * MB for t in range(STEPS)]
        values = [float(r[1]) for r in rows[1:]]
        if key == "random_ltd/kept_length":
            assert values == KEPT
        elif key == "random_ltd/consumed_layer_tokens":
            assert values == [expected_consumed(t) for t in range(STEPS)]
        elif key == "random_ltd/lr":
            assert all(v > 0 for v in values)


def test_wandb_credentials_from_env_or_netrc(tmp_path) -> None:
    from random_ltd.monitor import wandb_credentials_configured

    netrc_file = tmp_path / "netrc"
    assert not wandb_credentials_configured({"NETRC": str(netrc_file)})  # no file
    assert wandb_credentials_configured({"WANDB_API_KEY": "k", "NETRC": str(netrc_file)})
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc_file.chmod(0o600)
    assert wandb_credentials_configured({"NETRC": str(netrc_file)})  # `wandb login` writes this
    assert not wandb_credentials_configured({"NETRC": str(netrc_file), "WANDB_BASE_URL": "https://wandb.example.com"})
