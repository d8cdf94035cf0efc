"""Every storage backend passes the conformance suite: local disk, fsspec memory, S3 (moto)."""

from __future__ import annotations

import pytest

from shardckpt.storage import LocalStorage, open_storage
from shardckpt.testing.storage_conformance import StorageConformance


class TestLocal(StorageConformance):
    @pytest.fixture
    def storage(self, tmp_path):
        return LocalStorage(tmp_path)


class TestMemory(StorageConformance):
    @pytest.fixture
    def storage(self, memory_url):
        return open_storage(memory_url)


class TestS3(StorageConformance):
    @pytest.fixture
    def storage(self, s3_url):
        url, opts = s3_url
        return open_storage(url, opts)
