import pytest

from shardckpt.testing import Faults


@pytest.fixture
def faults(monkeypatch) -> Faults:
    """Fault injection into the save/load pipeline, undone after the test."""
    return Faults(monkeypatch)


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint path that does not exist yet."""
    return tmp_path / "ckpt"
