"""``release_shm_buffers``: a rank unlinks its own DeepSpeed CPU allreduce buffer name, and nothing else."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from random_ltd.integrations.deepspeed import launcher_guard


@pytest.fixture
def shm(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher_guard, "SHM_DIR", str(tmp_path))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29777")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    barriers = []
    monkeypatch.setattr(dist, "barrier", lambda: barriers.append(1))
    names = [tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29777_{r}" for r in (0, 1)]
    other = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29778_1"  # another run's
    for f in (*names, other):
        f.write_bytes(b"x")
    return names, other, barriers, monkeypatch


def test_removes_only_this_ranks_buffer_after_a_barrier(shm):
    (rank0, rank1), other, barriers, _ = shm
    assert launcher_guard.release_shm_buffers() == str(rank1)
    assert barriers == [1] and not rank1.exists() and rank0.exists() and other.exists()
    assert launcher_guard.release_shm_buffers() is None  # already gone: a no-op


def test_no_op_when_deepspeed_made_no_buffers(shm):
    (rank0, rank1), _, barriers, monkeypatch = shm
    monkeypatch.setenv("LOCAL_SIZE", "1")  # ranks on several nodes: DeepSpeed uses no shm
    assert launcher_guard.release_shm_buffers() is None and rank1.exists() and not barriers
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert launcher_guard.release_shm_buffers() is None and rank1.exists() and not barriers
