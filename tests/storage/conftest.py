"""Fixtures for the storage tests: a moto S3 server on loopback (once per session) and fresh
prefixes on it. The S3 tests skip, with the reason, when s3fs or moto cannot be imported; CI
installs both (the ``test`` extra)."""

from __future__ import annotations

import uuid

import pytest


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
