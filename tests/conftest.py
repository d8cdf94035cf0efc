import os
import uuid

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


# Object stores: a moto S3 server on loopback (once per session) and fresh prefixes on it. The
# S3 tests skip, with the reason, when s3fs or moto cannot be imported; CI installs both (the
# ``test`` extra).
@pytest.fixture(scope="session")
def s3_server():
    """``(storage_options, "s3://bucket")`` of a moto server for the whole session."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'shardckpt[test]')")
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    from shardckpt.testing.s3_server import moto_s3
    with moto_s3() as server:
        yield server


@pytest.fixture
def s3_url(s3_server):
    """``(url, storage_options)``: an unused prefix in the test bucket."""
    opts, bucket = s3_server
    return f"{bucket}/{uuid.uuid4().hex[:12]}", opts


@pytest.fixture
def memory_url():
    """An unused ``memory://`` prefix (fsspec's in-process store), removed afterwards."""
    pytest.importorskip("fsspec")
    import fsspec
    root = f"shardckpt-{uuid.uuid4().hex[:12]}"
    yield f"memory://{root}"
    fsspec.filesystem("memory").rm(f"/{root}", recursive=True) if \
        fsspec.filesystem("memory").exists(f"/{root}") else None


# Experiment trackers: one real `mlflow server` on loopback (sqlite store, local artifact
# root) for the session, shared by tests/integrations/test_mlflow.py and the docs examples.
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A started ``tests.integrations.tracker_servers.MlflowServer`` (``.url``, ``.port``)."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'shardckpt[test]')")
    from tests.integrations.tracker_servers import MlflowServer
    server = MlflowServer(str(tmp_path_factory.mktemp("mlflow"))).start()
    yield server
    server.stop()
