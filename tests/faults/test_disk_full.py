"""Disk full: a save raises DiskFullError, leaves no temporary files, and every checkpoint that
was there before still loads.

As root the saves go to a real 8 MiB tmpfs mounted for the test (data files or the manifest
overflow it); elsewhere the same steps run with ENOSPC injected at the same two places.
"""

import os

import pytest
import torch

import shardckpt
from shardckpt.errors import DiskFullError, StorageError
from shardckpt.testing.faults import fill, tiny_filesystem
from tests.helpers import assert_same

from .conftest import small_state


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request, tmp_path, faults):
    """``(folder, real)``: where to save, and whether it is a real tiny file system (an
    ``injected`` run arms the fault itself through ``faults`` when the test asks)."""
    where = tmp_path / "mnt"
    where.mkdir()
    if request.param == "injected":
        yield where, False
        return
    with tiny_filesystem(where, "8m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root on Linux); 'injected' covers it")
        yield where, True


def many_tensors(n: int = 3000) -> dict:
    """Little data, a large manifest (one entry per tensor)."""
    return {f"layer{i}.weight": torch.full((2,), float(i)) for i in range(n)}


@pytest.mark.parametrize("overflows", ["data", "manifest"])
def test_disk_full_raises_cleans_up_and_keeps_earlier_checkpoints(disk, faults, overflows):
    where, real = disk
    earlier = [small_state(0), small_state(1)]
    for i, state in enumerate(earlier):
        shardckpt.save(state, where / f"step-{i}", codec="zstd")
    if overflows == "data":
        state = {"big": torch.randn(4 << 20)}  # 16 MiB raw, twice the file system
        if not real:
            faults.disk_full("data")
    else:
        state = many_tensors()
        if real:  # room for the data files, not for the ~500 KiB manifest
            fill(where, 160 << 10)
        else:
            faults.disk_full("manifest")
    with pytest.raises(DiskFullError) as info:
        shardckpt.save(state, where / "step-2", codec="raw")
    assert isinstance(info.value, StorageError) and isinstance(info.value, OSError)
    assert ("committing" if overflows == "manifest" else "disk full while writing") \
        in str(info.value)
    assert sorted(n for n in os.listdir(where) if n != "filler") == ["step-0", "step-1"]
    for i, state in enumerate(earlier):
        assert_same(state, shardckpt.load_full(where / f"step-{i}"))
        shardckpt.verify(where / f"step-{i}")
    if real:  # the failed save's space came back: once the filler is gone, a save fits again
        if os.path.exists(where / "filler"):
            os.unlink(where / "filler")
        shardckpt.save(state if overflows == "manifest" else small_state(2), where / "step-2")
        shardckpt.verify(where / "step-2")


def test_disk_full_while_overwriting_keeps_the_old_checkpoint(disk, faults):
    where, real = disk
    shardckpt.save(small_state(0), where / "latest")
    if real:
        fill(where, 64 << 10)
    else:
        faults.disk_full("data")
    with pytest.raises(DiskFullError):
        shardckpt.save({"big": torch.randn(1 << 20)}, where / "latest", overwrite=True,
                       codec="raw")
    assert sorted(n for n in os.listdir(where) if n != "filler") == ["latest"]
    assert_same(small_state(0), shardckpt.load_full(where / "latest"))
