"""Fixtures shared by the fault and hostile-input tests."""

import pytest
import torch

import shardckpt
from shardckpt.testing.hostile import AuditLog


def small_state(seed: int = 0) -> dict:
    """A few tensors of different dtypes (some compress, some do not) and plain leaves."""
    gen = torch.Generator().manual_seed(seed)
    return {"model": {"w": (torch.randn(40, 16, generator=gen) * 0.02).to(torch.bfloat16),
                      "b": torch.randn(64, generator=gen),
                      "ids": torch.arange(96, dtype=torch.int32)},
            "step": 7 + seed, "name": "run-a", "lr": 0.5}


@pytest.fixture
def saved(tmp_path):
    """``(path, state)`` of a committed checkpoint with several chunks in two data files."""
    path, state = tmp_path / "ckpt", small_state()
    shardckpt.save(state, path, codec="zstd", chunk_bytes=256)
    return path, state


@pytest.fixture
def audit():
    """Records the Python audit events (file opens, unpickling, processes) of the test."""
    with AuditLog() as log:
        yield log
