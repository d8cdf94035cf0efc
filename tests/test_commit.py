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
