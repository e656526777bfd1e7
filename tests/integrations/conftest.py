"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest
from netutil import free_port


@pytest.fixture(scope="module")
def dist_env():
    """A one-process 'world' for DeepSpeed's env:// rendezvous on a free port."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            mp.setenv(key, value)
        yield
