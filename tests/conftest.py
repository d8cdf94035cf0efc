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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with SHARDCKPT_SLOW=1 (pyproject.toml's marker)."""
    if os.environ.get("SHARDCKPT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow soak test; SHARDCKPT_SLOW=1 runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
