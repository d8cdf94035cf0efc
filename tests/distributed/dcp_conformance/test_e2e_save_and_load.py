"""Adapted from PyTorch's test/distributed/checkpoint/e2e/test_e2e_save_and_load.py.

Kept: the end-to-end train -> save -> load -> train-one-more-step check with a stateful object and
a train state holding an ``io.BytesIO`` (``test_e2e``), async save, stateful vs plain loads, empty
saves without a process group, and partial / template-free loads (``_load_state_dict_from_keys``).
Changed: upstream needs 4 GPUs for FSDP1 / HSDP / DDP; here FSDP2 (``fully_shard``, FSDP1 needs an
accelerator) and DDP run on 2 CPU gloo ranks, plain models in one process; ``torch.compile`` and
the process-based async checkpointer and stager options are left out (they test DCP's staging,
not the storage layer). ``TestCheckpointOrderingAndOverwrite`` is left out: it checks DCP's
planner ordering and FileSystemWriter's overwrite of a folder, which the Writer deliberately
does not do silently (``overwrite=True`` is its explicit form, tested elsewhere).
"""

from __future__ import annotations

import io
import os
import warnings

import torch
import torch.distributed.checkpoint.state_dict_saver as saver
from torch.distributed.checkpoint.state_dict import (_patch_model_state_dict,
                                                     _patch_optimizer_state_dict,
                                                     get_model_state_dict)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from shardckpt.integrations.dcp import Reader, Writer
from shardckpt.testing import run_with_ranks

from .common import LinearStack, load, save


class StatefulObj:
    """Arbitrary stateful state (upstream's TestStatefulObj)."""

    def __init__(self, seed: int):
        self.data = torch.rand(10, 10, generator=torch.Generator().manual_seed(seed))

    def state_dict(self):
        return {"data": self.data}

    def load_state_dict(self, state_dict):
        self.data = state_dict["data"]


class TrainState:
    """Step, loss and the loss history as torch.save'd bytes in a BytesIO (upstream's
    TestTrainState)."""

    def __init__(self):
        self.step, self.current_loss, self.losses = 0, -1.0, []

    def state_dict(self):
        buf = io.BytesIO()
        torch.save(self.losses, buf)
        return {"step": torch.tensor(self.step, dtype=torch.int32),
                "current_loss": torch.tensor(self.current_loss, dtype=torch.float32),
                "losses": buf}

    def load_state_dict(self, state_dict):
        self.step = state_dict["step"].item()
        self.current_loss = state_dict["current_loss"].item()
        state_dict["losses"].seek(0)
        self.losses = torch.load(state_dict["losses"])

    def key(self):
        return self.step, self.current_loss, self.losses


def _create(kind, world):
    model = LinearStack()
    if kind == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    elif kind == "ddp":
        model = DistributedDataParallel(model)
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    if kind != "none":
        _patch_model_state_dict(model)
        _patch_optimizer_state_dict(model, optimizers=optim)
    return model, optim


def _train(model, optim, steps):
    torch.manual_seed(0)
    loss, state = None, TrainState()
    for _ in range(steps):
        loss = model(torch.rand(8, 8)).sum()
        loss.backward()
        state.step += 1
        state.current_loss = torch.rand(1).item()
        state.losses.append(state.current_loss)
        optim.step()
        optim.zero_grad()
    return loss, state


def _e2e(kind, world, path, async_op=False):
    model, optim = _create("none", world)
    _train(model, optim, 2)
    dist_model, dist_optim = _create(kind, world)
    _, train_state = _train(dist_model, dist_optim, 2)
    obj = StatefulObj(3)
    sd = {"model": dist_model, "optimizer": dist_optim, "s": obj, "train_state": train_state}
    if async_op:
        saver.async_save(sd, storage_writer=Writer(path)).result()
    else:
        save(sd, path)
    loaded_obj, loaded_state = StatefulObj(4), TrainState()
    dist_model, dist_optim = _create(kind, world)
    load({"model": dist_model, "optimizer": dist_optim, "s": loaded_obj,
          "train_state": loaded_state}, path)
    assert torch.equal(obj.data, loaded_obj.data)
    assert train_state.key() == loaded_state.key()
    loss, _ = _train(model, optim, 1)
    dist_loss, _ = _train(dist_model, dist_optim, 1)
    assert torch.equal(loss, dist_loss), (kind, loss, dist_loss)


def test_e2e_one_process(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _e2e("none", 1, str(tmp_path / "sync"))
        _e2e("none", 1, str(tmp_path / "async"), async_op=True)


def _e2e_ranks(rank, world, root):
    warnings.simplefilter("ignore")
    for kind in ("fsdp", "ddp"):
        _e2e(kind, world, os.path.join(root, kind))
    _e2e("fsdp", world, os.path.join(root, "fsdp-async"), async_op=True)
    _partial_load(world, os.path.join(root, "partial"))


def _partial_load(world, path):
    model, optim = _create("none", world)
    _train(model, optim, 2)
    dist_model, dist_optim = _create("fsdp", world)
    _train(dist_model, dist_optim, 2)
    save({"model": dist_model, "optimizer": dist_optim}, path)
    fresh, _ = _create("fsdp", world)
    load({"model": fresh}, path)
    want = get_model_state_dict(model)
    got = {k: v.full_tensor() for k, v in get_model_state_dict(fresh).items()}
    assert all(torch.equal(want[k], got[k]) for k in want)
    # another way: no template at all
    loaded = _load_state_dict_from_keys("model", storage_reader=Reader(path))["model"]
    assert set(loaded) == set(want) and all(torch.equal(want[k], loaded[k]) for k in want)
    state = _load_state_dict_from_keys("optimizer.state", storage_reader=Reader(path))
    state = state["optimizer"]["state"]
    own = dist_optim.state_dict()["state"]
    assert "param_groups" not in state and set(state) == set(own)
    for k, v in own.items():
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[k][field], v[field].full_tensor()
                               if hasattr(v[field], "full_tensor") else v[field]), (k, field)


def test_e2e_fsdp_ddp_async_and_partial_load_on_2_ranks(tmp_path):
    run_with_ranks(2, _e2e_ranks, str(tmp_path), timeout=300)


class _RecordingDict(dict):
    def __init__(self):
        super().__init__()
        self.set_called = False

    def __setitem__(self, k, v):
        self.set_called = True
        super().__setitem__(k, v)


class _Foo(Stateful):
    def __init__(self):
        self.loaded = False

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        self.loaded = True


def test_stateful_and_non_stateful_loads(tmp_path):
    foo, sd = _Foo(), _RecordingDict()
    sd["foo"] = foo
    sd.set_called = False
    save(sd, tmp_path / "a")
    load(sd, tmp_path / "a")
    assert foo.loaded and not sd.set_called  # loaded in place, not replaced
    sd = _RecordingDict()
    sd["foo"] = {"replicated": torch.rand(10, 10), "bytes": [1, 2, 3, 4]}
    sd.set_called = False
    save(sd, tmp_path / "b")
    load(sd, tmp_path / "b")
    assert sd.set_called


def test_no_dist(tmp_path):
    save({}, tmp_path / "c")
    load({}, tmp_path / "c")
