"""The local tier on 2 nodes x 2 gloo ranks on one machine (node identity through the
environment): replicas restore a wiped node, resharding 4 -> 2; a corrupt local shard falls back
to its replica; no local copy falls back to the durable tier; a rank killed mid-save or
mid-replication commits nothing and the previous local checkpoint restores."""

import json
import os
import shutil
import signal
import warnings

import pytest
import torch

import shardckpt
from shardckpt.testing import run_with_ranks
from shardckpt.testing.faults import tiny_filesystem

PER_NODE = 2


def full(step: int) -> dict:
    base = torch.arange(12 * 5, dtype=torch.float32).reshape(12, 5)
    return {"w": base + step, "b": torch.arange(8, dtype=torch.int64) * step,
            "plain": torch.linspace(0, 1, 7) * step}


def state(world: int, step: int | None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    values = full(0 if step is None else step)
    if step is None:
        values = {k: torch.zeros_like(v) for k, v in values.items()}
    return {"model": {"w": distribute_tensor(values["w"], mesh, [Shard(0)]),
                      "b": distribute_tensor(values["b"], mesh, [Shard(0)]),
                      "plain": values["plain"]},
            "step": -1 if step is None else step}


def _env(rank: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_WORLD_SIZE=str(PER_NODE),
                      SHARDCKPT_DIST_TIMEOUT="20")  # 8 s timed out under CI load
    os.environ.pop("GROUP_RANK", None)


def manager(root, local, **kw):
    kw = {"every_n_steps": None, "local_every_n_steps": 1, "async_save": False,
          "handle_preemption": False, "local_on_busy": "wait", **kw}
    return shardckpt.CheckpointManager(root, local_dir=f"{local}/node-{{node}}", **kw)


def _save(rank, world, root, local, steps, every_n_steps=None, die=None, big=0,
          promote=False):
    _env(rank)
    m = manager(root, local, every_n_steps=every_n_steps, promote_local=promote)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in steps:
            if die is not None and step == die[1] and rank == 3:
                m._tier.wait()  # the previous local save is done: it must not die with it
                _arm_death(die[0])
            values = state(world, step)
            if big:
                values["big"] = torch.full((big,), float(rank))  # per rank: one file each
            m.maybe_save(step, values)
        m.close()  # flushes the local save in flight (its failure is a warning)
    return [str(w.message) for w in seen if "shardckpt" in str(w.message)]


def _arm_death(where: str) -> None:
    """Make this rank SIGKILL itself in the middle of the next local save."""
    from shardckpt.dist import transfer
    from shardckpt.manage.tier import local as tiers
    if where == "write":
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        tiers.write_rank = die
    else:
        real = transfer._Writers.put

        def put(self, rel, data):
            real(self, rel, data)  # the first block lands, then the rank dies
            os.kill(os.getpid(), signal.SIGKILL)
        transfer._Writers.put = put
        os.environ["SHARDCKPT_LOCAL_TRANSFER_BYTES"] = "64"  # many blocks per file


def _restore(rank, world, root, local):
    _env(rank)
    m = manager(root, local)
    target = state(world, None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        step = m.restore(target)
    model = target["model"]
    return {"step": step, "target_step": target["step"],
            "w": model["w"].full_tensor(), "b": model["b"].full_tensor(),
            "plain": model["plain"],
            "warnings": [str(w.message) for w in seen if "shardckpt" in str(w.message)]}


def assert_restored(results, step):
    want = full(step)
    for res in results:
        got = res.value
        assert got["step"] == step and got["target_step"] == step
        for key in ("w", "b", "plain"):
            assert torch.equal(got[key], want[key]), key


def committed(local, node):
    folder = os.path.join(local, f"node-{node}")
    return sorted(n for n in os.listdir(folder)
                  if os.path.exists(os.path.join(folder, n, "manifest.json")))


@pytest.mark.parametrize("wiped, world", [(1, 2), (0, 4)])
def test_wiped_node_restores_from_replicas(tmp_path, wiped, world):
    """Node 1 lost, node 0 restarts alone (4 -> 2 ranks); or node 0 lost and rebuilt from
    node 1's copy (manifest and every data file fetched) before all 4 ranks load."""
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    run_with_ranks(4, _save, root, local, [1, 2, 3], timeout=120)
    assert committed(local, 0) == committed(local, 1) == ["step-00000003"]  # local_keep=1
    node0 = os.listdir(os.path.join(local, "node-0", "step-00000003", "data"))
    assert {n.split(".")[0] for n in node0} == {f"rank-{r:05d}" for r in range(4)}  # + replicas
    shutil.rmtree(os.path.join(local, f"node-{wiped}"))
    # no durable checkpoint (the root holds only the job id that binds the local tier to it)
    assert [n for n in os.listdir(root) if not n.startswith(".")] == []
    results = run_with_ranks(world, _restore, root, local, timeout=120)
    assert_restored(results, 3)
    if world == 4:
        assert any("fetched" in w for w in results[0].value["warnings"])
        shardckpt.verify(os.path.join(local, "node-0", "step-00000003"))


def test_corrupt_local_shard_uses_replica(tmp_path):
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    run_with_ranks(4, _save, root, local, [1, 2], timeout=120)
    victim = os.path.join(local, "node-0", "step-00000002", "data", "rank-00000.bin")
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) - 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    results = run_with_ranks(4, _restore, root, local, timeout=120)
    assert_restored(results, 2)
    said = " ".join(results[0].value["warnings"])
    assert "rank-00000.bin" in said and "node 0" in said, said
    shardckpt.verify(os.path.join(local, "node-0", "step-00000002"))  # repaired in place


@pytest.mark.parametrize("promote", [False, True])
def test_no_local_copy_uses_durable(tmp_path, promote):
    """The durable step 2 saved as usual, or promoted from the local tier (each rank copying
    its own files from its node)."""
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    run_with_ranks(4, _save, root, local, [1, 2, 3], 2, None, 0, promote, timeout=120)
    with open(os.path.join(root, "step-00000002", "manifest.json")) as f:
        meta = json.load(f)["metadata"]["shardckpt.manager"]
    assert meta["step"] == 2 and meta["reason"] == ("local" if promote else "periodic")
    for node in (0, 1):
        shutil.rmtree(os.path.join(local, f"node-{node}"))
    results = run_with_ranks(4, _restore, root, local, timeout=120)
    assert_restored(results, 2)


@pytest.mark.parametrize("where", ["write", "replicate"])
def test_rank_killed_mid_local_save_keeps_previous(tmp_path, where):
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    results = run_with_ranks(4, _save, root, local, [1, 2], None, (where, 2),
                             timeout=120, expect_errors=True)
    assert results[3].exitcode == -signal.SIGKILL
    for res in results[:3]:
        assert res.error is None, res.traceback
        assert any("local save of step 2" in w for w in res.value), res.value
    for node in (0, 1):
        assert committed(local, node) == ["step-00000001"]
    results = run_with_ranks(4, _restore, root, local, timeout=120)
    assert_restored(results, 1)


def test_full_local_dir_on_one_node_fails_the_local_save_everywhere(tmp_path):
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    os.makedirs(os.path.join(local, "node-1"))
    with tiny_filesystem(os.path.join(local, "node-1"), "2m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
        # 1 MiB per rank: node 1 needs 2 own + 2 replicas = 4 MiB in its 2 MiB
        results = run_with_ranks(4, _save, root, local, [1], 1, None, 1 << 18, timeout=120)
        assert os.listdir(os.path.join(local, "node-1")) == []  # no debris either
    for res in results:
        assert any("local save of step 1" in w for w in res.value), res.value
    assert any("DiskFullError" in w for res in results[2:] for w in res.value)
    assert committed(local, 0) == []
    assert shardckpt.verify(os.path.join(root, "step-00000001")).ok  # the durable tier went on
