"""Adapted from PyTorch's test/distributed/checkpoint/test_format_utils.py.

``dcp_to_torch_save`` and ``torch_save_to_dcp`` hard-code FileSystemReader / FileSystemWriter, so
their adaptation runs the same steps with the adapters: a template-free load through
``_EmptyStateDictLoadPlanner`` (it rebuilds the nested state from ``Metadata.planner_data``)
followed by ``torch.save``, and a ``torch.load`` followed by a save through the Writer.
``test_online_torch_save_to_dcp`` is left out: it loads a ``torch.save`` file through
``BroadcastingTorchSaveReader`` into FSDP on GPUs and involves neither adapter.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from shardckpt.integrations.dcp import Reader

from .common import LinearStack, load, save


def _uneven():
    return LinearStack(sizes=(5, 10, 15, 30, 5))


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


def test_dcp_to_torch_save(tmp_path):
    model = _uneven()
    save({"model": model}, tmp_path / "dcp")
    sd: dict = {}
    _load_state_dict(sd, storage_reader=Reader(str(tmp_path / "dcp")),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    torch.save(sd, tmp_path / "model.pt")
    _assert_same(torch.load(tmp_path / "model.pt"), {"model": model.state_dict()})


def test_torch_save_to_dcp(tmp_path):
    sd = {"model": _uneven().state_dict()}
    torch.save(sd, tmp_path / "model.pt")
    save(torch.load(tmp_path / "model.pt"), tmp_path / "dcp")
    model = LinearStack(sizes=(5, 10, 15, 30, 5), seed=1)
    load({"model": model}, tmp_path / "dcp")
    _assert_same({"model": model.state_dict()}, sd)
