"""Damaged files and interrupted saves: always a typed error, never a damaged commit."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import shardckpt
from shardckpt.errors import (CheckpointNotFoundError, CorruptCheckpointError,
                              IncompleteCheckpointError)
from shardckpt.testing import flip_byte, truncate
from tests.helpers import assert_same


@pytest.fixture
def small(ckpt):
    """A small checkpoint (raw and compressed chunks) whose every byte can be flipped."""
    gen = torch.Generator().manual_seed(0)
    state = {"w": (torch.randn(200, generator=gen) * 0.02).to(torch.bfloat16),
             "n": torch.randn(50, generator=gen), "i": torch.arange(40, dtype=torch.int32)}
    shardckpt.save(state, ckpt, codec="zstd", chunk_bytes=128)
    return ckpt, state


def test_every_single_byte_corruption_of_a_data_file_is_detected(small):
    path, state = small
    data = path / "data" / "rank-00000.bin"
    for offset in range(os.path.getsize(data)):
        flip_byte(data, offset)
        with pytest.raises(CorruptCheckpointError) as info:
            shardckpt.load_full(path)
        flip_byte(data, offset)
        assert info.value.file == "data/rank-00000.bin"
        if offset >= 16:  # past the header every byte belongs to a named chunk of a tensor
            assert info.value.tensor in state and info.value.chunk is not None
    assert_same(state, shardckpt.load_full(path))


def test_corruption_fails_verify_and_in_place_load(small):
    path, state = small
    flip_byte(path / "data" / "rank-00000.bin", 100)
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        shardckpt.verify(path)
    with pytest.raises(CorruptCheckpointError):
        shardckpt.load({k: torch.zeros_like(v) for k, v in state.items()}, path)


def test_truncated_or_missing_data_file(small):
    path, _ = small
    data = path / "data" / "rank-00000.bin"
    truncate(data, 1)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        shardckpt.load_full(path)
    os.unlink(data)
    with pytest.raises(CorruptCheckpointError, match="missing"):
        shardckpt.verify(path)


def test_missing_checkpoint_and_missing_manifest(small, tmp_path):
    path, _ = small
    with pytest.raises(CheckpointNotFoundError):
        shardckpt.load_full(tmp_path / "nothing")
    os.unlink(path / "manifest.json")
    with pytest.raises(IncompleteCheckpointError):
        shardckpt.load_full(path)
    with pytest.raises(FileNotFoundError):  # also the stdlib type
        shardckpt.verify(path)


def test_failure_before_manifest_commits_nothing(tmp_path, faults):
    older = tmp_path / "older"
    shardckpt.save({"x": torch.ones(3)}, older)
    faults.before_manifest("raise")
    with pytest.raises(OSError):
        shardckpt.save({"x": torch.zeros(3)}, tmp_path / "newer")
    assert sorted(os.listdir(tmp_path)) == ["older"]  # temporary folder removed
    with pytest.raises(CheckpointNotFoundError):
        shardckpt.load_full(tmp_path / "newer")
    assert torch.equal(shardckpt.load_full(older)["x"], torch.ones(3))


def test_crash_before_manifest_leaves_nothing_loadable(tmp_path):
    older, newer = tmp_path / "older", tmp_path / "newer"
    shardckpt.save({"x": torch.ones(3)}, older)
    script = textwrap.dedent(f"""
        import pytest, torch, shardckpt
        from shardckpt.testing import Faults
        mp = pytest.MonkeyPatch()
        Faults(mp).before_manifest("kill")
        shardckpt.save({{"x": torch.zeros(1 << 20)}}, {str(newer)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -9
    leftovers = [n for n in os.listdir(tmp_path) if n != "older"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".newer.tmp-")  # hidden, uncommitted
    with pytest.raises(CheckpointNotFoundError):
        shardckpt.load_full(newer)
    assert torch.equal(shardckpt.load_full(older)["x"], torch.ones(3))
    shardckpt.verify(older)


def test_crash_while_overwriting_keeps_the_old_checkpoint(tmp_path, faults):
    path = tmp_path / "c"
    shardckpt.save({"x": torch.ones(3)}, path)
    faults.before_manifest("raise")
    with pytest.raises(OSError):
        shardckpt.save({"x": torch.zeros(3)}, path, overwrite=True)
    assert torch.equal(shardckpt.load_full(path)["x"], torch.ones(3))
