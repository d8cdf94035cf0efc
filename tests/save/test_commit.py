"""The commit protocol: atomic appearance, refusal to clobber, atomic replacement."""

import os

import pytest
import torch

import shardckpt
from shardckpt.errors import CheckpointExistsError


def test_existing_checkpoint_is_not_clobbered(ckpt):
    shardckpt.save({"x": torch.ones(2)}, ckpt)
    with pytest.raises(CheckpointExistsError):
        shardckpt.save({"x": torch.zeros(2)}, ckpt)
    assert torch.equal(shardckpt.load_full(ckpt)["x"], torch.ones(2))


def test_overwrite_replaces_atomically_and_cleans_up(ckpt):
    shardckpt.save({"x": torch.ones(2)}, ckpt)
    shardckpt.save({"x": torch.zeros(2), "y": 1}, ckpt, overwrite=True)
    loaded = shardckpt.load_full(ckpt)
    assert torch.equal(loaded["x"], torch.zeros(2)) and loaded["y"] == 1
    assert os.listdir(ckpt.parent) == [ckpt.name]


def test_an_empty_folder_may_be_saved_into(ckpt):
    ckpt.mkdir()
    shardckpt.save({"x": torch.ones(2)}, ckpt)
    assert torch.equal(shardckpt.load_full(ckpt)["x"], torch.ones(2))


def test_layout_on_disk(ckpt):
    shardckpt.save({"x": torch.ones(2)}, ckpt)
    assert sorted(os.listdir(ckpt)) == ["data", "manifest.json"]
    assert os.listdir(ckpt / "data") == ["rank-00000.bin"]
    assert (ckpt / "data" / "rank-00000.bin").read_bytes()[:8] == b"SHRDCKPT"


def test_remove_leftovers_keeps_a_lone_set_aside_copy(tmp_path):
    from shardckpt.format import root as rootdir
    from shardckpt.storage import open_storage
    shardckpt.save({"w": torch.ones(3)}, tmp_path / "a")
    for name in (".a.old-0011", ".b.old-2233", ".c.tmp-4455"):
        (tmp_path / name / "data").mkdir(parents=True)
    storage = open_storage(tmp_path)
    assert sorted(rootdir.leftovers(storage)) == [".a.old-0011", ".b.old-2233", ".c.tmp-4455"]
    assert sorted(rootdir.remove_leftovers(storage)) == [".a.old-0011", ".c.tmp-4455"]
    assert sorted(os.listdir(tmp_path)) == [".b.old-2233", "a"]  # b's only copy survives


def test_in_place_debris_is_found_and_cleared_by_the_next_save(ckpt):
    from shardckpt.format.root import leftovers
    from shardckpt.storage import open_storage
    (ckpt / "data").mkdir(parents=True)  # what a crash mid in-place save leaves: no manifest
    (ckpt / "data" / "rank-00000.bin").write_bytes(b"SHRDCKPT" + b"\0" * 40)
    with pytest.raises(shardckpt.IncompleteCheckpointError):
        shardckpt.load_full(ckpt)
    assert leftovers(open_storage(str(ckpt.parent))) == [ckpt.name]
    shardckpt.async_save({"x": torch.ones(2)}, ckpt, in_place=True).result(timeout=60)
    assert torch.equal(shardckpt.load_full(ckpt)["x"], torch.ones(2))
    assert os.listdir(ckpt.parent) == [ckpt.name]
