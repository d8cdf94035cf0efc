"""verify(collect=True): every bad file and chunk is reported, not just the first."""

import os
import time

import pytest
import torch

import shardckpt
from shardckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from shardckpt.storage import LocalStorage
from shardckpt.testing import flip_byte


def _flip_chunk(path, key, index) -> str:
    """Damage chunk ``index`` of tensor ``key`` (one shard); the data file it lies in."""
    from shardckpt.format.opening import open_for_read
    m, _ = open_for_read(path)
    file, offset = m.tensors[key].chunks[index, :2].tolist()
    flip_byte(path / m.files[file].path, offset + 5)
    return m.files[file].path


def _save(ckpt):
    state = {"a": torch.arange(4096.0), "b": torch.arange(4096, dtype=torch.int64)}
    # raw: a flipped byte is then a checksum failure at a known chunk, never a decode error
    shardckpt.save(state, ckpt, codec="raw", chunk_bytes=4096, files_per_rank=2)
    return state


def test_collect_reports_every_bad_chunk(ckpt):
    _save(ckpt)
    expected = {(_flip_chunk(ckpt, key, index), key, index)
                for key, index in (("a", 1), ("a", 3), ("b", 2))}
    seen = []
    report = shardckpt.verify(ckpt, collect=True, progress=seen.append)
    assert not report.ok
    found = {(p.file, p.tensor, p.chunk) for p in report.problems}
    assert found == expected
    assert all(isinstance(p, CorruptCheckpointError) for p in report.problems)
    assert sum(seen) == report.stored_bytes
    with pytest.raises(CorruptCheckpointError):  # the default still raises the first
        shardckpt.verify(ckpt)


def test_collect_sound_and_missing_file(ckpt):
    _save(ckpt)
    assert shardckpt.verify(ckpt, collect=True).ok
    gone = sorted(os.listdir(ckpt / "data"))[0]
    os.unlink(ckpt / "data" / gone)
    report = shardckpt.verify(ckpt, collect=True)
    assert [(p.file, p.tensor) for p in report.problems] == [(f"data/{gone}", None)]


def test_collect_still_raises_for_uncommitted(tmp_path):
    (tmp_path / "half" / "data").mkdir(parents=True)
    with pytest.raises(IncompleteCheckpointError):
        shardckpt.verify(tmp_path / "half", collect=True)


def test_local_storage_modified(tmp_path):
    s = LocalStorage(tmp_path)
    assert s.modified("nope") is None
    s.write("f", b"x")
    os.utime(tmp_path / "f", (1000.0, 1000.0))
    assert s.modified("f") == 1000.0
    assert abs(s.modified("") - time.time()) < 60
