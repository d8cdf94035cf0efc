"""Sharded saves on N gloo ranks load bit-exactly on M ranks, for every N, M in 1..4."""

import pytest
import torch

import shardckpt
from shardckpt.testing import run_with_ranks
from tests.helpers import assert_same

WORLDS = [1, 2, 3, 4]


def expected_full() -> dict:
    """The global values every layout is cut from (uneven sizes on purpose)."""
    ramp = torch.arange(10 * 7, dtype=torch.float32).reshape(10, 7)
    return {"s0": ramp, "s1": torch.arange(5 * 9, dtype=torch.int64).reshape(5, 9),
            "rep": torch.linspace(0, 1, 6), "plain": torch.arange(11, dtype=torch.float64),
            "bf": (torch.arange(13) / 7).to(torch.bfloat16), "scalar": torch.tensor(2.5),
            "c3": torch.arange(3 * 5 * 2, dtype=torch.float16).reshape(3, 5, 2)}


def sharded_state(world: int, zeros: bool = False) -> dict:
    """This rank's state: DTensors in Shard(0) / Shard(1) / Replicate, plain tensors, and
    per-rank values (a data position and an RNG-like tensor)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = expected_full()
    if zeros:
        full = {k: torch.zeros_like(v) for k, v in full.items()}
    rank = dist.get_rank() if dist.is_initialized() else 0
    return {
        "model": {"s0": distribute_tensor(full["s0"], mesh, [Shard(0)]),
                  "s1": distribute_tensor(full["s1"], mesh, [Shard(1)]),
                  "rep": distribute_tensor(full["rep"], mesh, [Replicate()]),
                  "bf": distribute_tensor(full["bf"], mesh, [Shard(0)]),
                  "c3": distribute_tensor(full["c3"], mesh, [Shard(1)]),
                  "plain": full["plain"], "scalar": full["scalar"]},
        "data": {"position": -1 if zeros else 100 + rank},
        "rng": torch.zeros(3, dtype=torch.uint8) if zeros else torch.full((3,), rank,
                                                                           dtype=torch.uint8),
        "step": 0 if zeros else 42,
    }


def _save(rank, world, path, codec):
    info = shardckpt.save(sharded_state(world), path, codec=codec, chunk_bytes=48, timeout=30)
    return info.raw_bytes


def _load(rank, world, paths):
    """Load every saved world's checkpoint into this world's layout; return what it saw."""
    seen = {}
    for saved_world, path in paths.items():
        state = sharded_state(world, zeros=True)
        if saved_world not in (1, world):  # one saving rank: nothing is known to be per-rank
            with pytest.raises(shardckpt.StateMismatchError, match="data/position"):
                shardckpt.load(state, path, timeout=30)
        shardckpt.load(state, path, per_rank="rank0", timeout=30)
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
                for k, v in state["model"].items()}
        assert_same(expected_full(), {k: full[k] for k in expected_full()})
        owner = rank if saved_world == world else 0
        assert state["data"]["position"] == 100 + owner
        assert state["rng"].tolist() == [owner] * 3
        assert state["step"] == 42
        seen[saved_world] = True
    return seen


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    paths = {}
    for n in WORLDS:
        paths[n] = str(root / f"world{n}")
        run_with_ranks(n, _save, paths[n], "zstd" if n % 2 else "raw")
    return paths


@pytest.mark.parametrize("world", WORLDS)
def test_load_every_saved_world_on(world, saved):
    results = run_with_ranks(world, _load, saved)
    assert all(r.value == {n: True for n in WORLDS} for r in results)


@pytest.mark.parametrize("n", WORLDS)
def test_load_full_consolidates(n, saved):
    state = shardckpt.load_full(saved[n])
    assert_same(expected_full(), {k: state["model"][k] for k in expected_full()})
    assert state["data"]["position"] == 100
    last = shardckpt.load_full(saved[n], rank=n - 1)
    assert last["data"]["position"] == 100 + n - 1


def test_replicated_tensors_are_written_once(saved):
    path = saved[4]
    m = shardckpt.format.opening.open_manifest(*shardckpt.storage.open_checkpoint(path))
    shards = {k: len(t.boxes) for k, t in m.tensors.items()}
    assert shards["model/rep"] == shards["model/plain"] == shards["model/scalar"] == 1
    assert shards["model/s0"] == 4 and shards["model/s1"] == 4
    assert {k for k in m.tensors if k.startswith("rng")} == {f"rng@rank{r}" for r in range(4)}
    raw = sum(int(t.chunks[:, 4].sum()) for t in m.tensors.values())
    want = sum(t.numel() for t in expected_full().values()) + 4 * 3
    assert raw == want  # one copy of everything replicated, plus the per-rank RNG copies
    assert len({f.rank for f in m.files}) >= 2  # the writes were spread over ranks
    shardckpt.verify(path)


def _save_uneven_per_rank(rank, world, path):
    state = {"buf": torch.arange(rank + 2, dtype=torch.float64 if rank else torch.float32)}
    shardckpt.save(state, path, timeout=30)


def test_per_rank_tensors_of_different_shapes_and_dtypes(tmp_path):
    path = str(tmp_path / "ckpt")
    run_with_ranks(2, _save_uneven_per_rank, path)
    assert torch.equal(shardckpt.load_full(path)["buf"], torch.arange(2, dtype=torch.float32))
    assert torch.equal(shardckpt.load_full(path, rank=1)["buf"],
                       torch.arange(3, dtype=torch.float64))
