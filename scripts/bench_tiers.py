"""The local tier on 4 gloo ranks (2 nodes x 2 through the environment): restore time from the
local tier against the durable tier, and the stall of a local save against a durable one.

Usage:
    python scripts/bench_tiers.py [--mib 256] [--reps 3]

The state is one Shard(0) float32 DTensor of ``--mib`` MiB in all. The durable tier is a folder
on the disk; its files are evicted from the page cache (posix_fadvise DONTNEED on each file, not
a global drop) before each durable restore. The local tier lives in /dev/shm. Restores: durable
(cold), local (every node intact), local with node 1's folder wiped (its files fetched from node
0 over gloo before the load). Stalls: the wall time of one synchronous local save (write +
replicate + commit) and of one synchronous durable save, slowest rank, from a barrier.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import bench_common as bc  # noqa: E402
import shardckpt  # noqa: E402
from shardckpt.testing import run_with_ranks  # noqa: E402

WORLD, PER_NODE = 4, 2


def _state(world: int, mib: int, zeros: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    n = mib << 18  # float32 elements
    gen = torch.Generator().manual_seed(0)
    full = torch.zeros(n) if zeros else torch.randn(n, generator=gen)
    return {"w": distribute_tensor(full, mesh, [Shard(0)])}


def _evict(folder: str) -> None:
    for base, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(base, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _timed(fn):
    import torch.distributed as dist
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - t0, out


def _manager(root, local):
    kw = {"local_dir": local, "local_every_n_steps": 1} if local else {}
    return shardckpt.CheckpointManager(root, async_save=False, handle_preemption=False,
                                       save_options={"codec": "raw"}, **kw)


def _run(rank, world, root, local, mib, reps):
    os.environ.update(RANK=str(rank), LOCAL_WORLD_SIZE=str(PER_NODE))
    out = {"local_save": [], "durable_save": [], "durable_restore": [], "local_restore": []}
    state = _state(world, mib, False)
    m = _manager(root, local)
    for rep in range(reps):
        dt, _ = _timed(lambda: m._tier.save(1, state, {}))
        out["local_save"].append(dt)
        dt, _ = _timed(lambda: m.save(1, state))
        out["durable_save"].append(dt)
    durable = _manager(root, None)
    for rep in range(reps):
        if rank % PER_NODE == 0:
            _evict(os.path.join(root, "step-00000001"))
        target = _state(world, mib, True)
        dt, step = _timed(lambda: durable.restore(target))
        assert step == 1 and torch.equal(target["w"].to_local(), state["w"].to_local())
        out["durable_restore"].append(dt)
        target = _state(world, mib, True)
        dt, step = _timed(lambda: m.restore(target))
        assert step == 1 and torch.equal(target["w"].to_local(), state["w"].to_local())
        out["local_restore"].append(dt)
    import torch.distributed as dist
    if rank == PER_NODE:  # node 1's first rank wipes its node's copy
        shutil.rmtree(m._tier.path(1))
    dist.barrier()
    target = _state(world, mib, True)
    dt, step = _timed(lambda: m.restore(target))
    assert step == 1 and torch.equal(target["w"].to_local(), state["w"].to_local())
    out["local_restore_node1_wiped"] = [dt]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-tiers-", dir=os.environ.get("BENCH_DIR", "/tmp"))
    shm = tempfile.mkdtemp(prefix="bench-tiers-", dir="/dev/shm")
    try:
        res = run_with_ranks(WORLD, _run, os.path.join(work, "durable"),
                             os.path.join(shm, "node-{node}"), args.mib, args.reps,
                             timeout=1800)[0].value
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    rows = [[k, f"{bc.median(v):.3f}", " ".join(f"{x:.3f}" for x in v)] for k, v in res.items()]
    print(f"state {args.mib} MiB on {WORLD} ranks (2 nodes x 2), codec raw, reps {args.reps}")
    print(bc.table(["what", "median s", "runs s"], rows))
    dr, lr = bc.median(res["durable_restore"]), bc.median(res["local_restore"])
    print(f"restore durable(cold)/local = {dr / lr:.2f}x; durable(cold)/local-node1-wiped = "
          f"{dr / res['local_restore_node1_wiped'][0]:.2f}x")
    print(f"save stall local/durable = "
          f"{bc.median(res['local_save']) / bc.median(res['durable_save']):.2f}")


if __name__ == "__main__":
    main()
