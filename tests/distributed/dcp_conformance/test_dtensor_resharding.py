"""Adapted from PyTorch's test/distributed/checkpoint/test_dtensor_resharding.py.

Upstream skips below 2 GPUs; here every case runs on 4 CPU gloo ranks (the 2-D mesh is 2 x 2).
All placement pairs run inside one 4-rank launch per test, each pair into its own folder (no
DCP-format assertion exists upstream, so nothing is left out but the device).
"""

from __future__ import annotations

import itertools
import os

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, zeros

from shardckpt.testing import run_with_ranks

from .common import load, save

ONE_D = [[Shard(0)], [Replicate()]]
TWO_D = [[Replicate(), Replicate()], [Replicate(), Shard(0)], [Shard(0), Replicate()],
         [Shard(0), Shard(0)]]


def _global():
    return torch.arange(16, dtype=torch.float).view(4, 4)


def _round_trip(path, save_mesh, save_placement, load_mesh, load_placement, first=True):
    """Save the global tensor laid out one way (unless not ``first``: saved already), load it
    laid out another, check both ways."""
    saved = distribute_tensor(_global(), save_mesh, placements=save_placement)
    if first:
        save({"dtensor": saved}, path)
    target = {"dtensor": zeros([4, 4], device_mesh=load_mesh, placements=load_placement)}
    load(target, path)
    whole = target["dtensor"].redistribute(load_mesh, [Replicate()] * load_mesh.ndim)
    assert torch.equal(whole.to_local(), _global()), (save_placement, load_placement)
    if load_mesh is save_mesh:
        back = whole.redistribute(save_mesh, save_placement)
        assert torch.equal(back.to_local(), saved.to_local())


def _placement_change(rank, world, root):
    mesh_1d = init_device_mesh("cpu", (world,))
    mesh_2d = init_device_mesh("cpu", (2, world // 2))
    for i, (a, b) in enumerate(itertools.permutations(ONE_D, 2)):
        _round_trip(os.path.join(root, f"1d-{i}"), mesh_1d, a, mesh_1d, b)
    for i, (a, b) in enumerate(itertools.permutations(TWO_D, 2)):
        _round_trip(os.path.join(root, f"2d-{i}"), mesh_2d, a, mesh_2d, b)


def test_reshard_placement_change_1d_and_2d(tmp_path):
    run_with_ranks(4, _placement_change, str(tmp_path))


def _mesh_change(rank, world, root):
    mesh_1d = init_device_mesh("cpu", (world,))
    mesh_2d = init_device_mesh("cpu", (2, world // 2))
    for i, p1 in enumerate(ONE_D):
        for j, p2 in enumerate(TWO_D):
            _round_trip(os.path.join(root, f"from-1d-{i}"), mesh_1d, p1, mesh_2d, p2, j == 0)
    for i, p2 in enumerate(TWO_D):
        for j, p1 in enumerate(ONE_D):
            _round_trip(os.path.join(root, f"from-2d-{i}"), mesh_2d, p2, mesh_1d, p1, j == 0)


def test_reshard_mesh_change_1d_to_2d_and_back(tmp_path):
    run_with_ranks(4, _mesh_change, str(tmp_path))
