"""Adapted from PyTorch's test/distributed/checkpoint/test_fsdp_model_state.py.

Upstream wraps ``nn.Linear(8, 8, device="meta")`` in FSDP1 on 4 GPUs; FSDP1 needs an accelerator
(it raises "FSDP needs a non-CPU accelerator device" on CPU), so this runs FSDP2 (``fully_shard``)
on 4 CPU gloo ranks, whose SHARDED state dict is DTensors as FSDP1's is. Upstream's resharding
case loads into an FSDP over even/odd sub-groups; here the second model is sharded over a 2 x 2
HSDP mesh (Replicate across 2, Shard across 2): the same change of shard layout, expressed as a
mesh. Parameters are built on the CPU and given different seeds (the meta-device materialization
is FSDP1-specific). No DCP-format assertion exists upstream.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from shardckpt.testing import run_with_ranks

from .common import load, save


def _model(seed, mesh):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 8)
    fully_shard(model, mesh=mesh)
    return model


def _full(model):
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def _fsdp_model_state(rank, world, root):
    flat = init_device_mesh("cpu", (world,))
    hsdp = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = _model(0, flat)
    model(torch.rand(8, 8)).sum().backward()
    save({"model": model.state_dict()}, os.path.join(root, "c"))
    for name, mesh in [("no_resharding", flat), ("with_resharding", hsdp)]:
        model_2 = _model(1, mesh)
        assert not torch.equal(_full(model)["weight"], _full(model_2)["weight"]), name
        state = {"model": model_2.state_dict()}
        load(state, os.path.join(root, "c"))
        model_2.load_state_dict(state["model"])
        for k, v in _full(model).items():
            assert torch.equal(v, _full(model_2)[k]), (name, k)


def test_fsdp_model_state_no_resharding_and_with_resharding(tmp_path):
    run_with_ranks(4, _fsdp_model_state, str(tmp_path))
