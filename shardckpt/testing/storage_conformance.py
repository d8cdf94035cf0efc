"""The storage conformance suite: the behaviour every ``Storage`` backend must show.

Subclass ``StorageConformance`` in a test module and give it a ``storage`` fixture returning an
empty storage of the backend under test; pytest then runs every ``test_*`` below against it. The
suite checks the contract of ``shardckpt.storage.base``: whole and ranged reads, create-if-absent
writes, listing, deletion, the declared capabilities (rename only where ``atomic_rename``,
multipart only where ``multipart_min_bytes``), and that a checkpoint saved through it loads
byte-exactly and is recognised as committed.
"""

from __future__ import annotations

import os

import pytest

from ..save import commit, upload
from ..format import root as rootdir
from ..storage import Storage


class StorageConformance:
    """Base class of a backend's conformance tests; subclasses provide ``storage``."""

    @pytest.fixture
    def storage(self) -> Storage:
        raise NotImplementedError("subclasses provide an empty storage")

    def test_write_then_read(self, storage):
        storage.makedirs("a")
        storage.write("a/x.bin", b"hello world")
        assert storage.exists("a/x.bin") and storage.exists("a")
        assert storage.read("a/x.bin") == b"hello world"
        assert storage.size("a/x.bin") == 11

    def test_ranged_read(self, storage):
        storage.write("r.bin", bytes(range(256)))
        assert storage.read("r.bin", 10, 5) == bytes(range(10, 15))
        assert storage.read("r.bin", 250) == bytes(range(250, 256))

    def test_missing(self, storage):
        assert not storage.exists("nope")
        with pytest.raises(FileNotFoundError):
            storage.size("nope")
        with pytest.raises(FileNotFoundError):
            storage.read("nope")
        assert storage.list("nope") == []
        storage.delete("nope")  # missing is fine

    def test_write_is_create_if_absent(self, storage):
        storage.write("m.json", b"one")
        with pytest.raises(FileExistsError):
            storage.write("m.json", b"two")
        assert storage.read("m.json") == b"one"
        storage.write("m.json", b"three", exclusive=False)
        assert storage.read("m.json") == b"three"

    def test_list_is_sorted_and_shallow(self, storage):
        storage.makedirs("d/sub")
        for name in ("d/b", "d/a", "d/sub/c"):
            storage.write(name, b"x")
        assert storage.list("d") == ["a", "b", "sub"]
        assert "d" in storage.list("")

    def test_delete_file_and_folder(self, storage):
        storage.makedirs("f/g")
        storage.write("f/g/1", b"1")
        storage.write("f/2", b"2")
        storage.delete("f/2")
        assert not storage.exists("f/2") and storage.exists("f/g/1")
        storage.delete("f")
        assert not storage.exists("f") and storage.list("f") == []

    def test_capabilities(self, storage):
        assert isinstance(storage.atomic_rename, bool)
        assert isinstance(storage.multipart_min_bytes, int) and storage.multipart_min_bytes >= 0
        if not storage.atomic_rename:
            with pytest.raises(NotImplementedError):
                storage.rename("a", "b")
        local = storage.local_path("x")
        assert local is None or os.path.isabs(local)
        assert isinstance(storage.url("x"), str) and storage.url("x").endswith("x")

    def test_upload_in_parts(self, storage):
        size = max(storage.multipart_min_bytes, 1 << 16)
        parts = [os.urandom(size // 2 + 7) for _ in range(5)]  # joined up to the minimum
        storage.makedirs("up")
        assert upload.upload(storage, "up/big", iter(parts), concurrency=3) == \
            sum(map(len, parts))
        data = b"".join(parts)
        assert storage.read("up/big") == data
        assert storage.read("up/big", len(data) - 10, 10) == data[-10:]

    def test_checkpoint_commit_and_leftovers(self, storage):
        tx = commit.commit_for(storage, "ck").begin()
        storage.makedirs(tx.path("data"))
        storage.write(tx.path("data/rank-00000.bin"), b"payload")
        assert rootdir.list_checkpoints(storage) == []
        tx.commit(b"{}")
        tx.close()
        assert rootdir.is_committed(storage, "ck")
        assert not rootdir.is_committed(storage, "ck", validate=True)  # "{}" is no manifest
        assert rootdir.leftovers(storage) == []
