"""Issue 25, the local tier attacked further: what broke, and stays fixed.

- A partly received file (``data/.<file>.recv-<hex>``) that a killed transfer left in a
  committed local folder made every later local save of that step fail (CheckpointExistsError:
  "not part of a checkpoint"), as a run restarted from an older checkpoint does.
- A node restarted on a disk too small for the copy a restore fetches for it: the receiver
  stopped taking part in the transfers after its DiskFullError, the others timed out in gloo,
  and ``restore`` raised an untyped RuntimeError on every rank instead of falling back to the
  durable checkpoint.
"""

import os
import shutil
import warnings

import pytest
import torch

import shardckpt
from shardckpt.testing import run_with_ranks
from shardckpt.testing.faults import tiny_filesystem


def _state(step: int) -> dict:
    return {"w": torch.arange(3000, dtype=torch.float32) + step, "step": step}


def test_a_leftover_receipt_does_not_block_saving_that_step_again(tmp_path):
    local = tmp_path / "local"
    kw = dict(every_n_steps=None, local_every_n_steps=1, async_save=False,
              handle_preemption=False, local_on_busy="wait", local_dir=local)
    with shardckpt.CheckpointManager(tmp_path / "durable", **kw) as m:
        m.maybe_save(3, _state(3))
    debris = local / "step-00000003" / "data" / ".rank-00001.bin.recv-0badc0de"
    debris.write_bytes(b"half a file")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with shardckpt.CheckpointManager(tmp_path / "durable", **kw) as m:
            m.maybe_save(3, _state(30))  # a restarted run saves step 3 again
    assert not [str(w.message) for w in seen if "failed" in str(w.message)]
    assert not debris.exists()
    target = _state(0)
    shardckpt.load(target, local / "step-00000003")
    assert torch.equal(target["w"], _state(30)["w"])


def _env(rank: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_WORLD_SIZE="2", SHARDCKPT_DIST_TIMEOUT="8")
    os.environ.pop("GROUP_RANK", None)


def _dist_state(world: int, step: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(step)  # incompressible: the files keep their size
    return {"w": distribute_tensor(_full(step), mesh, [Shard(0)]), "step": step,
            "noise": torch.randn(32768, generator=g)}


def _full(step: int) -> torch.Tensor:
    return torch.arange(4096 * 8, dtype=torch.float32).reshape(4096, 8) + step


def _manager(root, local, **kw):
    kw = {"every_n_steps": 2, "local_every_n_steps": 1, "async_save": False,
          "handle_preemption": False, "local_on_busy": "wait", **kw}
    return shardckpt.CheckpointManager(root, local_dir=f"{local}/node-{{node}}", **kw)


def _save(rank, world, root, local):
    _env(rank)
    with _manager(root, local) as m:
        for step in (1, 2, 3):
            m.maybe_save(step, _dist_state(world, step))


def _restore(rank, world, root, local):
    _env(rank)
    target = _dist_state(world, 0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with _manager(root, local) as m:
            step = m.restore(target)
    return {"step": step, "w": target["w"].full_tensor(),
            "warnings": [str(w.message) for w in seen if "shardckpt" in str(w.message)]}


def test_a_node_too_small_for_the_fetched_copy_falls_back_to_durable(tmp_path):
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    run_with_ranks(4, _save, root, local, timeout=120)
    node1 = os.path.join(local, "node-1")
    shutil.rmtree(node1)
    os.makedirs(node1)
    with tiny_filesystem(node1, "128k") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
        results = run_with_ranks(4, _restore, root, local, timeout=120)
        assert os.listdir(node1) == []  # the failed fetch left nothing
    for res in results:
        assert res.value["step"] == 2  # the durable step: local step 3 could not be rebuilt
        assert torch.equal(res.value["w"], _full(2))
    said = " ".join(w for res in results for w in res.value["warnings"])
    assert "No space left on device" in said, said
