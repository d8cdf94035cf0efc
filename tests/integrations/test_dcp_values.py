"""shardckpt.integrations.dcp in one process: template-free loads, nested lists, bytes values, torch.Size,
folders that hold other files, and manifests that must cover every tensor before a commit."""

from __future__ import annotations

import dataclasses
import io
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import shardckpt
from shardckpt.integrations import dcp as sdcp
from shardckpt.save import merge
from shardckpt.integrations.dcp import Reader, Writer
from shardckpt.errors import (CheckpointExistsError, UnsafeCheckpointError,
                              UnsupportedValueError)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP: no process group


def _state():
    return {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4)},
            "optim": {"state": {"0": {"step": torch.tensor(3.0)}}, "lr": 0.5}, "step": 7}


def test_template_free_loads_come_back_nested(tmp_path):
    path = str(tmp_path / "c")
    dcp.save(_state(), storage_writer=Writer(path))
    meta = Reader(path).read_metadata()
    assert meta.planner_data["model.w"] == ("model", "w")
    model = _load_state_dict_from_keys("model", storage_reader=Reader(path))
    assert set(model) == {"model"} and torch.equal(model["model"]["w"], _state()["model"]["w"])
    everything = _load_state_dict_from_keys(storage_reader=Reader(path))
    assert everything["step"] == 7 and everything["optim"]["lr"] == 0.5
    assert torch.equal(everything["optim"]["state"]["0"]["step"], torch.tensor(3.0))
    # the Writer's tree is nested too, so plain shardckpt sees the same structure
    assert shardckpt.load_full(path, key="model/w").shape == (3, 4)


def test_reader_loads_nested_lists_and_sizes_from_shardckpt_save(tmp_path):
    path = str(tmp_path / "n")
    saved = {"x": [[torch.arange(3.0), torch.ones(2)], [torch.zeros(1)]],
             "shape": torch.Size([4, 5]), "plain": [1, 2, (3, 4)]}
    shardckpt.save(saved, path)
    target = {"x": [[torch.empty(3), torch.empty(2)], [torch.empty(1)]], "shape": None,
              "plain": None}
    dcp.load(target, storage_reader=Reader(path))
    assert torch.equal(target["x"][0][0], torch.arange(3.0)) and target["x"][1][0].item() == 0
    assert type(target["shape"]) is torch.Size and target["shape"] == (4, 5)
    assert target["plain"] == [1, 2, (3, 4)]
    full = shardckpt.load_full(path)
    assert type(full["shape"]) is torch.Size
    free = _load_state_dict_from_keys(storage_reader=Reader(path))
    assert torch.equal(free["x"][0][1], torch.ones(2))


def test_bytes_and_bytesio_round_trip_through_dcp(tmp_path):
    path = str(tmp_path / "b")
    losses = io.BytesIO()
    torch.save([0.5, 0.25], losses)
    state = {"blob": b"\x00\xffraw", "empty": b"", "buf": losses, "w": torch.ones(2),
             "size": torch.Size([2, 3])}
    dcp.save(state, storage_writer=Writer(path))
    target = {"blob": None, "empty": None, "buf": io.BytesIO(), "w": torch.zeros(2),
              "size": None}
    dcp.load(target, storage_reader=Reader(path))
    assert target["blob"] == b"\x00\xffraw" and target["empty"] == b""
    assert isinstance(target["buf"], io.BytesIO)
    assert target["buf"].getvalue() == losses.getvalue()
    assert type(target["size"]) is torch.Size and target["size"] == (2, 3)
    full = shardckpt.load_full(path)  # stored as uint8 tensors, read back as bytes
    assert full["blob"] == b"\x00\xffraw" and full["buf"].getvalue() == losses.getvalue()


def test_bytes_round_trip_through_shardckpt_save_and_load(tmp_path):
    path = str(tmp_path / "s")
    shardckpt.save({"a": b"xyz", "io": io.BytesIO(b"12"), "t": torch.ones(1)}, path)
    target = {"a": b"", "io": None, "t": torch.zeros(1)}
    shardckpt.load(target, path)
    assert target["a"] == b"xyz" and target["io"].getvalue() == b"12"


def _errors(info) -> list[BaseException]:
    """The exceptions behind a pytest.raises result: DCP wraps each rank's error in a
    CheckpointException (``failures``: {rank: (exception, traceback)})."""
    e = info.value
    failures = getattr(e, "failures", None)
    return [f[0] for f in failures.values()] if failures else [e]


class _Opaque:
    pass


def test_pickle_only_values_raise_unsupported_naming_the_key(tmp_path):
    with pytest.raises(UnsupportedValueError, match="cfg"):
        shardckpt.save({"cfg": _Opaque()}, str(tmp_path / "x"))
    with pytest.raises(BaseException) as info:  # DCP wraps every rank's error
        dcp.save({"cfg": {"obj": _Opaque()}, "w": torch.ones(1)},
                 storage_writer=Writer(str(tmp_path / "y")))
    (err,) = _errors(info)
    assert isinstance(err, UnsupportedValueError) and "cfg.obj" in str(err), err
    assert not os.path.exists(tmp_path / "y" / "manifest.json")


def test_unknown_node_kind_is_refused_as_unsafe(tmp_path):
    from shardckpt.format.tree import build
    with pytest.raises(UnsafeCheckpointError, match="unknown node kind"):
        build({"frobnicate": 1}, lambda k: None)


@pytest.mark.parametrize("how", ["writer", "save", "manager"])
def test_overwrite_never_deletes_foreign_files(tmp_path, how):
    folder = tmp_path / ("step-00000001" if how == "manager" else "ckpt")
    folder.mkdir()
    (folder / "config.yaml").write_text("lr: 1\n")
    with pytest.raises(BaseException) as info:
        if how == "writer":
            dcp.save(_state(), storage_writer=Writer(str(folder), overwrite=True))
        elif how == "save":
            shardckpt.save(_state(), str(folder), overwrite=True)
        else:
            mgr = shardckpt.CheckpointManager(str(tmp_path))
            try:
                mgr.save(1, _state())
                mgr.wait()
            finally:
                mgr.close()
    (err,) = _errors(info)
    assert isinstance(err, CheckpointExistsError) and "config.yaml" in str(err), err
    assert (folder / "config.yaml").read_text() == "lr: 1\n"


def test_an_existing_empty_folder_is_accepted(tmp_path):
    for name, save in [("w", lambda p: dcp.save(_state(), storage_writer=Writer(p))),
                       ("s", lambda p: shardckpt.save(_state(), p))]:
        folder = tmp_path / name
        folder.mkdir()
        save(str(folder))
        assert shardckpt.load_full(str(folder))["step"] == 7


def test_overwrite_replaces_a_checkpoint(tmp_path):
    path = str(tmp_path / "c")
    dcp.save(_state(), storage_writer=Writer(path))
    dcp.save({**_state(), "step": 8}, storage_writer=Writer(path, overwrite=True))
    assert shardckpt.load_full(path)["step"] == 8


def _drop_a_shard(m):
    key = next(k for k, t in m.tensors.items() if t.dtype.name == "float32" and t.shape)
    t = m.tensors[key]
    empty = type(t).build(t.dtype, t.shape, [])
    return dataclasses.replace(m, tensors={**m.tensors, key: empty})


@pytest.mark.parametrize("how", ["writer", "save", "async_save"])
def test_a_manifest_that_misses_a_shard_is_never_committed(tmp_path, monkeypatch, how):
    path = str(tmp_path / "c")
    if how == "writer":
        real = sdcp._manifest_from_dcp
        monkeypatch.setattr(sdcp, "_manifest_from_dcp", lambda *a: _drop_a_shard(real(*a)))
        with pytest.raises(BaseException) as info:
            dcp.save(_state(), storage_writer=Writer(path))
        (err,) = _errors(info)
        assert isinstance(err, UnsafeCheckpointError) and "refusing to commit" in str(err)
    else:
        real = merge.build_manifest
        from shardckpt.save import pipeline as saver
        monkeypatch.setattr(saver, "build_manifest", lambda *a: _drop_a_shard(real(*a)))
        with pytest.raises(UnsafeCheckpointError, match="refusing to commit"):
            if how == "save":
                shardckpt.save(_state(), path)
            else:
                shardckpt.async_save(_state(), path).result()
    assert not os.path.exists(path)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".c.tmp")]
