"""Adapted from PyTorch's test/distributed/checkpoint/test_save_load_api.py.

Upstream's ``test_auto_detect`` checks that DCP picks FileSystemWriter/Reader from a bare
``checkpoint_id`` and raises "Cannot detect" for ``abc://abc.abc``. That detection only runs
when no storage writer/reader is passed, so it says nothing about shardckpt's adapters and is
left out. What carries over: with a Writer/Reader passed, ``checkpoint_id`` retargets them
(DCP calls ``reset(checkpoint_id)``), one Writer instance serves several saves, and the model's
state round-trips. FSDP1 on GPUs becomes FSDP2 (``fully_shard``) on 2 CPU gloo ranks, because
FSDP1 needs an accelerator.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import shardckpt
from shardckpt.integrations.dcp import Reader, Writer
from shardckpt.testing import run_with_ranks

from .common import LinearStack


def _auto_detect(rank, world, root):
    warnings.simplefilter("ignore")
    model = LinearStack()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    writer, reader = Writer(os.path.join(root, "unused")), Reader(os.path.join(root, "unused"))
    for name in ("first", "second"):
        path = os.path.join(root, name)
        dcp.save(model.state_dict(), storage_writer=writer, checkpoint_id=path)
        target = LinearStack(seed=1)
        fully_shard(target, mesh=init_device_mesh("cpu", (world,)))
        sd = target.state_dict()
        dcp.load(sd, storage_reader=reader, checkpoint_id=path)
        target.load_state_dict(sd)
        for k, v in model.state_dict().items():
            assert torch.equal(v.full_tensor(), target.state_dict()[k].full_tensor()), (name, k)
    assert not os.path.exists(os.path.join(root, "unused"))


def test_checkpoint_id_retargets_the_adapters(tmp_path):
    run_with_ranks(2, _auto_detect, str(tmp_path))
    for name in ("first", "second"):
        shardckpt.verify(str(tmp_path / name))
