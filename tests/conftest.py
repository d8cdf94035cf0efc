import os

import pytest
from hypothesis import settings

from shardckpt.testing import Faults

# CI replays the same examples every run (a landing must not depend on luck); local runs keep
# exploring new ones, and what they find becomes an explicit test case.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def faults(monkeypatch) -> Faults:
    """Fault injection into the save/load pipeline, undone after the test."""
    return Faults(monkeypatch)


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint path that does not exist yet."""
    return tmp_path / "ckpt"
