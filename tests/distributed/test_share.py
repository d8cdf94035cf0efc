"""Distributed loads read each stored byte once (share.py, nodeshm.py): replicated, resharded,
the manifest once per node; integrity of shared bytes; a rank that dies mid-share; nothing left
in /dev/shm. Nodes are emulated through ``LOCAL_WORLD_SIZE`` (2 nodes x 2 ranks on this host).

Bytes are counted by a storage wrapper in every rank: the checkpoints are opened through fsspec's
``local://`` file system, so that every read (manifest, headers, chunks) passes through the
storage interface the wrapper sits on.
"""

import os
import threading
import time

import numpy as np
import pytest
import torch

import shardckpt
from shardckpt.dist import nodeshm
from shardckpt.load import share, shareplan
from shardckpt.format import tables
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


def is_manifest(path: str) -> bool:
    """The manifest and the chunk index files it lists (FORMAT.md 3.7) travel as one blob."""
    return path.endswith("manifest.json") or path.endswith(".idx")


def assert_no_byte_read_twice(reads) -> None:
    """Ranged data reads (a chunk, or a run of adjacent ones) never overlap each other."""
    spans = sorted((p, o, o + n) for p, o, n in reads
                   if "/data/" in p and n > 16 and not is_manifest(p))
    for (p, _, end), (q, start, _) in zip(spans, spans[1:]):
        assert p != q or start >= end, f"{p} bytes at {start} read twice"


def replicated_state(zeros=False) -> dict:
    gen = torch.Generator().manual_seed(7)
    state = {"w": torch.randn(300, 64, generator=gen), "b": torch.randn(999, generator=gen),
             "step": 5}
    return {k: torch.zeros_like(v) if zeros and isinstance(v, torch.Tensor) else v
            for k, v in state.items()}


def _share_on(local_world=None):
    """Sharing on (the default; set in case the environment says otherwise), and with
    ``local_world`` the ranks split into nodes of that many."""
    os.environ["SHARDCKPT_SHARE_READS"] = "1"
    if local_world:
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world)


def leftovers(pids) -> list[str]:
    """Share folders named after any of ``pids`` (the ranks that led a node)."""
    mine = f"{nodeshm.PREFIX}{os.getuid()}-"
    return [n for n in os.listdir(nodeshm.base_dir())
            if n.startswith(mine) and n[len(mine):].split("-")[0] in {str(p) for p in pids}]


def _load_replicated(rank, world, url, local_world=None):
    if local_world == "group":  # torchrun's node index itself: 2 nodes of 2
        os.environ["GROUP_RANK"], local_world = str(rank // 2), None
    _share_on(local_world)
    state = replicated_state(zeros=True)
    _, reads = counted(lambda: shardckpt.load(state, url, timeout=60))
    expect = replicated_state()
    assert torch.equal(state["w"], expect["w"]) and torch.equal(state["b"], expect["b"])
    return reads, os.getpid()


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    path = tmp_path_factory.mktemp("share") / "ddp"
    shardckpt.save(replicated_state(), str(path), codec="zstd", chunk_bytes=4 << 10)
    return path


@pytest.mark.parametrize("local_world, nodes", [(None, 1), (2, 2), ("group", 2), (1, 4)])
def test_replicated_load_reads_every_byte_once(replicated, local_world, nodes):
    results = run_with_ranks(4, _load_replicated, f"local://{replicated}", local_world,
                             timeout=180)
    reads = [r for res in results for r in res.value[0]]
    total = sum(n for *_, n in reads)
    assert total <= 1.05 * checkpoint_bytes(replicated), (total, checkpoint_bytes(replicated))
    assert_no_byte_read_twice(reads)
    for res in results:  # every rank read a share (runs of adjacent chunks are one read)
        assert any("/data/" in p and n > 16 for p, _, n in res.value[0]), res.rank
    manifest_readers = [res.rank for res in results
                        if any(r[0].endswith("manifest.json") for r in res.value[0])]
    assert manifest_readers == list(range(0, 4, 4 // nodes))  # each node's leader, once
    assert sum(r[0].endswith("manifest.json") for r in reads) == nodes
    assert leftovers(res.value[1] for res in results) == []


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


def _load_sharded(rank, world, url, local_world=None):
    _share_on(local_world)
    state = sharded_state(world, zeros=True)
    _, reads = counted(lambda: shardckpt.load(state, url, timeout=60))
    full = torch.arange(40 * 33, dtype=torch.float32).reshape(40, 33)
    assert torch.equal(state["s0"].full_tensor(), full)
    assert torch.equal(state["s1"].full_tensor(), full)
    return reads


@pytest.mark.parametrize("local_world", [None, 2])
def test_reshard_reads_each_chunk_once(tmp_path, local_world):
    path = tmp_path / "fsdp2"
    run_with_ranks(2, _save_sharded, str(path), timeout=120)
    results = run_with_ranks(4, _load_sharded, f"local://{path}", local_world, timeout=180)
    reads = [r for res in results for r in res.value]
    data = [(p, o, n) for p, o, n in reads if "/data/" in p and n > 16]
    assert data
    assert_no_byte_read_twice(reads)
    # The manifest and its index files are read once per node (each node's leader); the rest
    # once in the job.
    nodes = local_world and 2 or 1
    assert sum(p.endswith("manifest.json") for p, _, _ in reads) == nodes
    indexes = {p for p, _, _ in reads if p.endswith(".idx")}
    assert all(sum(p == i for p, _, _ in reads) == nodes for i in indexes)
    meta = sum(n for p, _, n in reads if is_manifest(p))
    rest = sum(n for *_, n in reads) - meta
    size = checkpoint_bytes(path) - meta // nodes
    assert rest <= 1.05 * size, (rest, size)


def _load_corrupt(rank, world, url, good, local_world):
    _share_on(local_world)
    state = replicated_state(zeros=True)
    with pytest.raises(shardckpt.CheckpointError) as info:
        shardckpt.load(state, url, timeout=60)
    shardckpt.load(state, good, timeout=60)  # the failed load left the ranks in step
    assert torch.equal(state["w"], replicated_state()["w"])
    return type(info.value).__name__, str(info.value), os.getpid()


@pytest.mark.parametrize("local_world", [None, 2])
def test_shared_bytes_are_checked_on_every_rank(replicated, tmp_path, local_world):
    import shutil
    path = tmp_path / "bad"
    shutil.copytree(replicated, path)
    data = path / "data" / sorted(os.listdir(path / "data"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside some chunk every rank needs
    data.write_bytes(bytes(raw))
    results = run_with_ranks(4, _load_corrupt, str(path), str(replicated), local_world,
                             timeout=180)
    # One rank read the damaged chunk; every rank decodes it from shared memory (or from what
    # gloo brought) itself, and each sees the checksum mismatch naming the file.
    for kind, message, _ in (res.value for res in results):
        assert kind == "CorruptCheckpointError", message
        assert data.name in message and "checksum" in message.lower(), message
    assert leftovers(res.value[2] for res in results) == []


def _die_mid_share(rank, world, path, local_world, pid_file):
    _share_on(local_world)
    import torch.distributed as dist
    if rank == 2:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))

        def die(*args, **kwargs):
            os._exit(3)
        if local_world:  # 2 nodes: rank 2 (node 1's leader) dies in the cross-node exchange
            dist.all_to_all_single = die
        else:  # one node: rank 2 dies reading its share, its shared-memory file made
            share.fetch = share.fetch_to_file = die
    state = replicated_state(zeros=True)
    t0 = time.monotonic()
    try:
        shardckpt.load(state, path, timeout=10)
    except shardckpt.RankFailureError as exc:
        return sorted(exc.failures), time.monotonic() - t0, os.getpid()
    return "loaded", time.monotonic() - t0, os.getpid()


@pytest.mark.parametrize("local_world", [None, 2])
def test_rank_dying_mid_share_fails_every_rank(replicated, tmp_path, local_world):
    pid_file = tmp_path / "pid"
    results = run_with_ranks(4, _die_mid_share, str(replicated), local_world, str(pid_file),
                             timeout=240, expect_errors=True)
    assert results[2].exitcode == 3
    for res in (results[0], results[1], results[3]):
        assert res.error is None, res.traceback
        failed, seconds, _ = res.value
        assert 2 in failed, res.value
        assert seconds < 3 * 10 + 15, res.value  # within the load's rounds' timeouts
    pids = [res.value[2] for res in results if res.value] + [int(pid_file.read_text())]
    assert leftovers(pids) == []  # survivors removed the folder, even the dead leader's


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


@pytest.mark.parametrize("env, world, path, expect", [
    ({}, 4, "/ckpt", False),                                      # one node, a file system
    ({}, 4, "file:///ckpt", False),
    ({}, 4, "s3://bucket/ckpt", True),                            # no page cache in front
    ({"LOCAL_WORLD_SIZE": "2"}, 4, "/ckpt", True),                # two nodes
    ({"SLURM_JOB_NUM_NODES": "2"}, 4, "/ckpt", True),
    ({"LOCAL_WORLD_SIZE": "4"}, 4, "/ckpt", False),
    ({"SHARDCKPT_SHARE_READS": "1"}, 4, "/ckpt", True),
    ({"SHARDCKPT_SHARE_READS": "0"}, 4, "s3://bucket/ckpt", False),
    ({"SHARDCKPT_SHARE_READS": "1"}, 1, "/ckpt", False),         # nothing to share
])
def test_sharing_is_on_where_a_page_cache_does_not_dedupe(monkeypatch, env, world, path, expect):
    for name in ("SHARDCKPT_SHARE_READS", "LOCAL_WORLD_SIZE", "SLURM_JOB_NUM_NODES",
                 "SLURM_NNODES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert share.enabled(world, path) is expect


def test_assign_sends_each_chunk_once_to_every_other_node():
    chunks = [[0, 16 + 100 * i, 100] for i in range(12)]
    payloads = {r: _needs(chunks) for r in range(4)} | {4: _needs(chunks[:1])}
    node = [0, 0, 1, 1, 1]
    plans = [shareplan.SharedPlan(shareplan.assign(payloads, node, stick_bytes=0), rank=r)
             for r in range(5)]
    plan = plans[0]
    received = np.zeros(5, np.int64)
    for c, (_, _, length, reader) in enumerate(plan.chunks):
        needers, sources = plan.entries(c)
        receivers = plan.receivers(c)
        assert len(receivers) == 1 and node[receivers[0]] != node[reader]  # one, elsewhere
        received[receivers[0]] += length
        for n, s in zip(needers, sources):
            assert node[s] == node[n]  # every needer takes it from its own node
            assert s == (reader if node[n] == node[reader] else receivers[0])
    assert {int(r) for r in plan.chunks[:, 3]} == {0, 1, 2, 3}  # reads spread over the job
    assert all((p.chunks == plan.chunks).all() for p in plans)


def test_sweep_removes_only_folders_of_dead_leaders(tmp_path, monkeypatch):
    import subprocess
    monkeypatch.setattr(nodeshm, "base_dir", lambda: str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tmp_path / nodeshm.folder_name(dead.pid, 1)
    alive = tmp_path / nodeshm.folder_name(os.getpid(), 1)
    for d in (gone, alive):
        d.mkdir(mode=0o700)
        (d / "r0-1").write_bytes(b"x")
    assert nodeshm.sweep() == [str(gone)]
    assert not gone.exists() and alive.exists()


def test_a_share_folder_others_could_write_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(nodeshm, "base_dir", lambda: str(tmp_path))
    folder = tmp_path / nodeshm.folder_name(os.getpid(), 7)
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(shardckpt.UnsafeCheckpointError, match="0700"):
        nodeshm.NodeFolder.attach(os.getpid(), 7)
    folder.chmod(0o700)
    mine = nodeshm.NodeFolder.attach(os.getpid(), 7)
    with pytest.raises(ValueError):
        mine.map_file("../../etc/passwd", 1)
    (folder / "r0-1").write_bytes(b"abc")
    with pytest.raises(shardckpt.UnsafeCheckpointError, match="expected 4"):
        mine.map_file("r0-1", 4)


def test_a_bad_share_mode_is_refused(monkeypatch):
    monkeypatch.setenv("SHARDCKPT_SHARE_READS", "sometimes")
    with pytest.raises(ValueError, match="SHARDCKPT_SHARE_READS"):
        share.enabled(2)
