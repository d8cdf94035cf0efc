"""An incremental save on 2 gloo ranks references the chunks that did not change, and loads
bit-exactly on 1 rank and on 2 ranks of another layout (resharding through the references)."""

import torch

import shardckpt
from shardckpt.format.opening import open_manifest
from shardckpt.storage import open_checkpoint
from shardckpt.testing import run_with_ranks
from tests.helpers import assert_same


def full(step: int) -> dict:
    """The global values at ``step``: ``frozen`` and ``plain`` never change."""
    ramp = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48)
    return {"frozen": ramp.sin(), "live": ramp.cos() + step,
            "plain": torch.arange(3000, dtype=torch.float64), "bias": torch.full((40,), step)}


def _state(world: int, step: int, placement) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    values = full(step)
    shard = [Shard(placement)]
    return {"model": {"frozen": distribute_tensor(values["frozen"], mesh, shard),
                      "live": distribute_tensor(values["live"], mesh, shard),
                      "plain": values["plain"],
                      "bias": distribute_tensor(values["bias"], mesh, [Shard(0)])},
            "step": step}


def _save(rank, world, root):
    shardckpt.save(_state(world, 1, 0), f"{root}/step-1", chunk_bytes=1024,
                   content_hashes=True, timeout=60)
    info = shardckpt.save(_state(world, 2, 0), f"{root}/step-2", chunk_bytes=1024,
                          base="step-1", timeout=60)
    return info.stats.get("chunks_reused", 0)


def _load(rank, world, root, placement):
    state = _state(world, 0, placement)
    shardckpt.load(state, f"{root}/step-2", timeout=60)
    got = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
           for k, v in state["model"].items()}
    assert_same(full(2), got)
    assert state["step"] == 2
    return True


def test_two_rank_incremental_save_reshards_on_load(tmp_path):
    root = str(tmp_path)
    reused = [r.value for r in run_with_ranks(2, _save, root, timeout=180)]
    assert all(n > 0 for n in reused)  # both ranks referenced chunks they did not rewrite
    m = open_manifest(*open_checkpoint(f"{root}/step-2"))
    frozen_files = {m.files[i] for k in ("model/frozen", "model/plain")
                    for i in m.tensors[k].chunks[:, 0]}
    assert all(f.base == "step-1" for f in frozen_files)
    assert {f.rank for f in frozen_files} == {0, 1}  # references to both ranks' files
    assert all(m.files[i].base is None for i in m.tensors["model/live"].chunks[:, 0])
    assert_same(full(2), shardckpt.load_full(f"{root}/step-2")["model"])
    assert shardckpt.verify(f"{root}/step-2").ok
    assert all(r.value for r in run_with_ranks(1, _load, root, 0, timeout=180))
    assert all(r.value for r in run_with_ranks(2, _load, root, 1, timeout=180))
