"""The local tier on 4 gloo ranks (2 nodes x 2 through the environment): restore time from the
local tier against the durable tier, and the stall of a local save against a durable one.

Usage:
    python scripts/bench/tiers.py [--mib 256] [--reps 3]

The state is one Shard(0) float32 DTensor of ``--mib`` MiB in all. The durable tier is a folder
on the disk; before each durable restore the page cache is dropped (as root: ``sync; echo 3 >
/proc/sys/vm/drop_caches``; otherwise posix_fadvise DONTNEED on each file). The local tier lives
in /dev/shm. Restores: durable (cold), local (every node intact), local with node 1's folder
wiped (its files fetched from node 0 over gloo before the load). Stalls (slowest rank, from a
barrier): a local save (``save_async``: the copy into the tier's arena; the background work is
timed apart, to its commit), a durable ``async_save`` and a synchronous durable save.
Training: a DDP MLP (``--hidden``, ``--batch``; one thread per rank) for ``--steps`` steps
without checkpoints, then with a local save every step (the manager, ``local_on_busy="skip"``);
mean step time of each and the % added.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import harness as bh  # noqa: E402
import shardckpt  # noqa: E402
from shardckpt.testing import run_with_ranks  # noqa: E402

WORLD, PER_NODE = 4, 2


def _state(world: int, mib: int, zeros: bool):
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = bh.cpu_mesh(world)
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


def _manager(root, local, async_save=False, every=None):
    kw = {"local_dir": local, "local_every_n_steps": 1} if local else {}
    return shardckpt.CheckpointManager(root, async_save=async_save, handle_preemption=False,
                                       every_n_steps=every, save_options={"codec": "raw"}, **kw)


def _drop_caches(rank: int, folder: str) -> str:
    """Make the durable tier's files cold; how ("drop_caches" or "fadvise")."""
    if os.geteuid() == 0:
        if rank == 0:
            bh.drop_page_cache()
        return "drop_caches"
    if rank % PER_NODE == 0:
        _evict(folder)
    return "fadvise"


def _run(rank, world, root, local, mib, reps):
    os.environ.update(RANK=str(rank), LOCAL_WORLD_SIZE=str(PER_NODE))
    out = {"local_save_stall": [], "local_save_background": [], "durable_async_stall": [],
           "durable_sync_save": [], "durable_restore": [], "local_restore": []}
    torch.set_num_threads(1)
    state = _state(world, mib, False)
    m = _manager(root, local)
    durable_async = _manager(root, None, async_save=True)
    for rep in range(reps):
        t0 = time.perf_counter()
        dt, _ = _timed(lambda: m._tier.save_async(1, state, {}))
        out["local_save_stall"].append(dt)
        assert m._tier.wait() is True
        out["local_save_background"].append(time.perf_counter() - t0)
        dt, _ = _timed(lambda: durable_async.save(1, state))
        out["durable_async_stall"].append(dt)
        durable_async.wait()
        dt, _ = _timed(lambda: m.save(1, state))
        out["durable_sync_save"].append(dt)
    durable_async.close()
    durable = _manager(root, None)
    for rep in range(reps):
        out["cold"] = _drop_caches(rank, os.path.join(root, "step-00000001"))
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
    m.close()
    durable.close()
    return out


def _train(rank, world, root, local, hidden, batch, steps):
    """Mean step time of a DDP MLP without checkpoints and with a local save every step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    os.environ.update(RANK=str(rank), LOCAL_WORLD_SIZE=str(PER_NODE))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 10))
    model = DDP(net)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, hidden), torch.randint(0, 10, (batch,))
    out = {"none": [], "local_every_step": []}
    step = 0
    # Interleaved blocks (none, local, none, local): the shared machine's load drifts.
    for mode in ("none", "local_every_step") * 2:
        m = _manager(root, local, async_save=True) if mode != "none" else None
        if m is not None:
            m._tier.on_busy = "skip"
        times = []
        for _ in range(steps // 2):
            step += 1
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if m is not None:
                t1 = time.perf_counter()
                m.maybe_save(step, {"model": net.state_dict(), "opt": opt.state_dict()})
                if len(times):  # a block's first step warms up
                    out.setdefault("save_call", []).append(time.perf_counter() - t1)
            times.append(time.perf_counter() - t0)
        if m is not None:
            m.close()
            out["skipped"] = out.get("skipped", 0) + m._tier.skipped
            out["failed"] = out.get("failed", 0) + m._tier.failed
            out["committed_last"] = m._tier.last_committed
        out[mode] += times[1:]  # a block's first step warms up (arena, threads)
    n_params = sum(p.numel() for p in net.parameters())
    out["state_mib"] = n_params * 12 / 2**20  # weights + Adam's two moments
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-tiers-", dir=os.environ.get("BENCH_DIR", "/tmp"))
    shm = tempfile.mkdtemp(prefix="bench-tiers-", dir="/dev/shm")
    try:
        res = run_with_ranks(WORLD, _run, os.path.join(work, "durable"),
                             os.path.join(shm, "node-{node}"), args.mib, args.reps,
                             timeout=1800)[0].value
        train = run_with_ranks(WORLD, _train, os.path.join(work, "train"),
                               os.path.join(shm, "train-{node}"), args.hidden, args.batch,
                               args.steps, timeout=1800)[0].value
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    cold = res.pop("cold")
    rows = [[k, f"{bh.median(v):.3f}", " ".join(f"{x:.3f}" for x in v)] for k, v in res.items()]
    print(f"state {args.mib} MiB on {WORLD} ranks (2 nodes x 2), codec raw, reps {args.reps}")
    print(bh.table(["what", "median s", "runs s"], rows))
    dr, lr = bh.median(res["durable_restore"]), bh.median(res["local_restore"])
    print(f"restore durable(cold)/local = {dr / lr:.2f}x; durable(cold)/local-node1-wiped = "
          f"{dr / res['local_restore_node1_wiped'][0]:.2f}x")
    print(f"durable tier made cold by: {cold}")
    ls, da = bh.median(res["local_save_stall"]), bh.median(res["durable_async_stall"])
    print(f"save stall local/durable-async = {ls / da:.2f}; local/durable-sync = "
          f"{ls / bh.median(res['durable_sync_save']):.2f}")
    base, every = bh.median(train["none"]), bh.median(train["local_every_step"])
    print(f"training: DDP MLP, {train['state_mib']:.1f} MiB state (weights + Adam), "
          f"{len(train['none'])} timed steps each, in interleaved blocks")
    print(f"  step no checkpoint {base:.3f} s, local save every step {every:.3f} s "
          f"(median): +{100 * (every / base - 1):.1f}% per step; local saves skipped "
          f"{train['skipped']}, failed {train['failed']}, last committed step "
          f"{train['committed_last']}")
    call = bh.median(train["save_call"])
    print(f"  maybe_save call (this rank's stall) median {call:.4f} s, max "
          f"{max(train['save_call']):.4f} s = {100 * call / base:.1f}% of the checkpoint-free "
          f"step")


if __name__ == "__main__":
    main()
