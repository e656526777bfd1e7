"""Shared fixtures: the backends usable on this machine, by device."""

from __future__ import annotations

import pytest
import torch

from random_ltd.ops.dispatch import PRIORITY

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def usable_backends(device: str) -> list:
    return [b for b in PRIORITY if not b.not_supported_reasons(torch.device(device))]


BACKEND_PARAMS = [
    pytest.param((b, d), id=f"{b.NAME}-{d}") for d in DEVICES for b in usable_backends(d)
]


@pytest.fixture(params=BACKEND_PARAMS)
def backend_device(request):
    """(backend, device) for every backend that runs here; the torch reference always runs."""
    return request.param
