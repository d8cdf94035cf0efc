"""Revision 1.4 on real ranks (FORMAT.md 3.7): DTensor and FSDP2 saves go by grid rule and
chunk index files, and load back on any world size and any placement."""

import json
import os

import torch

import shardckpt
from shardckpt.testing import run_with_ranks
from tests.data.golden.make_golden_index import full_state, rank_state
from tests.distributed.test_models import _load_fsdp, _train_fsdp_and_save
from tests.helpers import assert_same


def _save(rank, world, path):
    shardckpt.save(rank_state(rank, world), path, codec="zstd", chunk_bytes=64, timeout=60)


def _load_resharded(rank, world, path):
    """Every DTensor into Shard(1) (or Shard(0) for 1-D ones) on a fresh mesh: each rank's
    pieces cut across the saved cells."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    zero = {k: torch.zeros_like(v) for k, v in full_state()["model"].items()}
    model = {k: distribute_tensor(v, mesh, [Shard(1 if v.dim() > 1 else 0)])
             for k, v in zero.items()}
    state = {"model": model, "step": 0, "position": 0}
    shardckpt.load(state, path, timeout=60)
    return {"model": {k: v.full_tensor() for k, v in model.items()}, "step": state["step"],
            "position": state["position"]}


def test_dtensors_save_by_rule_and_reshard(tmp_path):
    path = str(tmp_path / "ckpt")
    run_with_ranks(2, _save, path)
    doc = json.load(open(os.path.join(path, "manifest.json")))
    assert sorted(i["path"] for i in doc["indexes"]) == ["data/rank-00000.idx",
                                                         "data/rank-00001.idx"]
    assert doc["tensors"]["model/w"]["grid"] == [[0, 2, "chunk"]]
    assert doc["tensors"]["model/r"]["grid"] == []  # replicated: one cell, written once
    assert "boxes" in doc["tensors"]["model/odd"]  # two mesh dims on one tensor dim: no rule
    expected = full_state()
    assert_same(expected, shardckpt.load_full(path))
    for result in run_with_ranks(2, _load_resharded, path):
        want = dict(expected, position=100 + result.rank)
        assert_same(want, result.value)
    shardckpt.verify(path)


def test_fsdp2_save_writes_index_files_and_reshards(tmp_path):
    path = str(tmp_path / "fsdp")
    expected = run_with_ranks(2, _train_fsdp_and_save, path)[0].value
    doc = json.load(open(os.path.join(path, "manifest.json")))
    assert len(doc["indexes"]) == 2 and doc["codecs"] == []
    assert any("grid" in t for t in doc["tensors"].values())
    for world in (1, 2):
        for result in run_with_ranks(world, _load_fsdp, {2: path}):
            assert_same(expected, result.value[2])
