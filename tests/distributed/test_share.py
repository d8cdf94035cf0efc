"""Distributed loads read each stored byte once (share.py): replicated, resharded, the manifest;
integrity of shared bytes; a rank that dies mid-share.

Bytes are counted by a storage wrapper in every rank: the checkpoints are opened through fsspec's
``local://`` file system, so that every read (manifest, headers, chunks) passes through the
storage interface the wrapper sits on.
"""

import os
import threading

import numpy as np
import pytest
import torch

import shardckpt
from shardckpt import share, tables
from shardckpt.storage import WRAPPERS
from shardckpt.storage.wrapper import StorageWrapper
from shardckpt.testing import run_with_ranks


class CountingStorage(StorageWrapper):
    """Sums the bytes every ``read`` returns, per (path, offset)."""

    def __init__(self, inner, log):
        super().__init__(inner)
        self.log = log

    def read(self, path, offset=0, length=None):
        data = self.inner.read(path, offset, length)
        with self.log["lock"]:
            self.log["reads"].append((path, offset, len(data)))
        return data


def counted(fn):
    """Run ``fn()`` with every storage it opens counted; returns ``(result, reads)``."""
    log = {"lock": threading.Lock(), "reads": []}
    wrap = lambda s: CountingStorage(s, log)  # noqa: E731
    WRAPPERS.append(wrap)
    try:
        return fn(), log["reads"]
    finally:
        WRAPPERS.remove(wrap)


def checkpoint_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def replicated_state(zeros=False) -> dict:
    gen = torch.Generator().manual_seed(7)
    state = {"w": torch.randn(300, 64, generator=gen), "b": torch.randn(999, generator=gen),
             "step": 5}
    return {k: torch.zeros_like(v) if zeros and isinstance(v, torch.Tensor) else v
            for k, v in state.items()}


def _share_on():
    """Share on one host too (``auto`` would not: these ranks are all on this machine)."""
    os.environ["SHARDCKPT_SHARE_READS"] = "1"


def _load_replicated(rank, world, url):
    _share_on()
    state = replicated_state(zeros=True)
    _, reads = counted(lambda: shardckpt.load(state, url, timeout=60))
    expect = replicated_state()
    assert torch.equal(state["w"], expect["w"]) and torch.equal(state["b"], expect["b"])
    return reads


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    path = tmp_path_factory.mktemp("share") / "ddp"
    shardckpt.save(replicated_state(), str(path), codec="zstd", chunk_bytes=4 << 10)
    return path


def test_replicated_load_reads_every_byte_once(replicated):
    results = run_with_ranks(4, _load_replicated, f"local://{replicated}", timeout=180)
    reads = [r for res in results for r in res.value]
    total = sum(n for *_, n in reads)
    assert total <= 1.05 * checkpoint_bytes(replicated), (total, checkpoint_bytes(replicated))
    chunk_reads = [(p, o) for p, o, n in reads if "/data/" in p and n > 16]
    assert len(chunk_reads) == len(set(chunk_reads))  # no chunk read twice
    assert {len(res.value) > 2 for res in results} == {True}  # every rank read a share
    manifest_reads = [r for r in reads if r[0].endswith("manifest.json")]
    assert len(manifest_reads) == 1  # one node here: the manifest is read once in all


def sharded_state(world, rows=40, zeros=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(rows * 33, dtype=torch.float32).reshape(rows, 33)
    full = torch.zeros_like(full) if zeros else full
    return {"s0": distribute_tensor(full, mesh, [Shard(0)]),
            "s1": distribute_tensor(full.clone(), mesh, [Shard(1)])}


def _save_sharded(rank, world, path):
    shardckpt.save(sharded_state(world), path, codec="raw", chunk_bytes=1024, timeout=60)


def _load_sharded(rank, world, url):
    _share_on()
    state = sharded_state(world, zeros=True)
    _, reads = counted(lambda: shardckpt.load(state, url, timeout=60))
    full = torch.arange(40 * 33, dtype=torch.float32).reshape(40, 33)
    assert torch.equal(state["s0"].full_tensor(), full)
    assert torch.equal(state["s1"].full_tensor(), full)
    return reads


def test_reshard_reads_each_chunk_once(tmp_path):
    path = tmp_path / "fsdp2"
    run_with_ranks(2, _save_sharded, str(path), timeout=120)
    results = run_with_ranks(3, _load_sharded, f"local://{path}", timeout=180)
    reads = [r for res in results for r in res.value]
    data = [(p, o, n) for p, o, n in reads if "/data/" in p and n > 16]
    covered = set()
    for p, o, n in data:  # ranged reads may hold runs of chunks; none may overlap another
        span = {(p, b) for b in range(o, o + n, 4)}
        assert not span & covered, f"{p} bytes at {o} read twice"
        covered |= span
    total = sum(n for *_, n in reads)
    assert total <= 1.05 * checkpoint_bytes(path), (total, checkpoint_bytes(path))


def _load_corrupt(rank, world, url, good):
    _share_on()
    state = replicated_state(zeros=True)
    with pytest.raises(shardckpt.CheckpointError) as info:
        shardckpt.load(state, url, timeout=60)
    shardckpt.load(state, good, timeout=60)  # the failed load left the ranks in step
    assert torch.equal(state["w"], replicated_state()["w"])
    return type(info.value).__name__, str(info.value)


def test_shared_bytes_are_checked_on_every_rank(replicated, tmp_path):
    import shutil
    path = tmp_path / "bad"
    shutil.copytree(replicated, path)
    data = path / "data" / sorted(os.listdir(path / "data"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside some chunk every rank needs
    data.write_bytes(bytes(raw))
    results = run_with_ranks(3, _load_corrupt, str(path), str(replicated), timeout=180)
    kinds = [res.value[0] for res in results]
    # Every rank decodes the damaged chunk itself: each sees the checksum mismatch.
    assert kinds == ["CorruptCheckpointError"] * 3, [res.value for res in results]


def _die_mid_share(rank, world, path):
    _share_on()
    import torch.distributed as dist
    if rank == 2:
        def die(*args, **kwargs):
            os._exit(3)
        dist.all_to_all_single = die
    state = replicated_state(zeros=True)
    try:
        shardckpt.load(state, path, timeout=15)
    except shardckpt.RankFailureError as exc:
        return sorted(exc.failures)
    return "loaded"


def test_rank_dying_mid_share_fails_every_rank(replicated):
    results = run_with_ranks(4, _die_mid_share, str(replicated), timeout=240,
                             expect_errors=True)
    assert results[2].exitcode == 3
    for res in (results[0], results[1], results[3]):
        assert res.error is None, res.traceback
        assert 2 in res.value, res.value


def _needs(rows):
    return {"need": tables.encode(np.array(rows, np.int64).reshape(-1, 3))}


def test_assign_gives_each_shared_chunk_one_reader_among_its_needers():
    chunks = [[0, 16 + 100 * i, 100] for i in range(40)]
    payloads = {0: _needs(chunks), 1: _needs(chunks), 2: _needs(chunks[:10]),
                3: _needs([[1, 16, 50]])}
    plan = share.SharedPlan(share.assign(payloads, stick_bytes=300), rank=2)
    assert len(plan.chunks) == 40  # file 1's chunk has one needer: not shared
    load = np.zeros(4, np.int64)
    for c, (f, off, length, reader) in enumerate(plan.chunks):
        assert reader in plan.needed_by(c)
        load[reader] += length
    assert load[3] == 0 and abs(load[0] - load[1]) <= 400
    assert plan.mine.sum() == 10
    assert all(len(r) <= 3 for r in plan.rounds(300))


def _load_missing(rank, world, path):
    _share_on()
    with pytest.raises(shardckpt.CheckpointError) as info:
        shardckpt.load({"w": torch.zeros(1)}, path, timeout=30)
    return type(info.value).__name__


def test_rank0_manifest_failure_is_raised_as_its_type_everywhere(tmp_path):
    results = run_with_ranks(3, _load_missing, str(tmp_path / "nothing"), timeout=120)
    assert [res.value for res in results] == ["CheckpointNotFoundError"] * 3


@pytest.mark.parametrize("env, world, expect", [
    ({}, 4, False),                                            # nobody says: one node
    ({"LOCAL_WORLD_SIZE": "4"}, 4, False),                     # torchrun, one node
    ({"LOCAL_WORLD_SIZE": "2"}, 4, True),                      # torchrun, two nodes
    ({"SLURM_JOB_NUM_NODES": "2"}, 4, True),
    ({"SHARDCKPT_SHARE_READS": "1"}, 4, True),
    ({"SHARDCKPT_SHARE_READS": "0", "LOCAL_WORLD_SIZE": "1"}, 4, False),
    ({"SHARDCKPT_SHARE_READS": "1"}, 1, False),                # nothing to share
])
def test_auto_shares_only_across_nodes(monkeypatch, env, world, expect):
    for name in ("SHARDCKPT_SHARE_READS", "LOCAL_WORLD_SIZE", "SLURM_JOB_NUM_NODES",
                 "SLURM_NNODES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert share.enabled(world) is expect


def test_a_bad_share_mode_is_refused(monkeypatch):
    monkeypatch.setenv("SHARDCKPT_SHARE_READS", "sometimes")
    with pytest.raises(ValueError, match="SHARDCKPT_SHARE_READS"):
        share.enabled(2)
