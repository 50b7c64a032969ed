"""Shared fixtures: the repository root, single-threaded torch, small data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Tests use tiny models: one thread is fastest and keeps results reproducible.
torch.set_num_threads(1)
os.environ.setdefault("LANDSCAPE_QUIET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread (a test that changes it cannot leak into the next)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def mnist1d():
    from landscape_lib import data

    return data.load("mnist1d")
