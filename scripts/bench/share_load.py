"""Distributed loads on 4 gloo ranks: bytes read from storage and wall time, shared reads vs not.

Usage:
    python scripts/bench/share_load.py [--mib 128] [--reps 3] [--cold] [--local-world 2]

Three load shapes, each into zeroed targets on 4 ranks: "DDP replicated" (plain tensors every
rank loads whole, saved by one process), "FSDP same world" (Shard(0) DTensors saved and loaded on
4 ranks), "reshard 2->4" (saved on 2 ranks, loaded on 4). Contenders: shardckpt with shared reads
(the default, share.py: shared memory within a node, gloo across nodes), shardckpt with
``SHARDCKPT_SHARE_READS=0`` (every rank reads what it needs), and DCP (``dcp.load`` with
``FileSystemReader``). ``--local-world 2`` emulates 2 nodes of 2 ranks (``LOCAL_WORLD_SIZE``).

Bytes read from storage, summed over ranks, are counted two ways: ``requested`` sums what
shardckpt asked storage for (native chunk reads, shared fetches, storage reads of manifest and
headers; every data-file header check counts 16 bytes); ``rchar`` is the kernel's count of bytes
each rank process read by read(2)/pread(2)/sendfile(2) during the load (it also counts reads of
sockets and pipes made through read(2), so gloo traffic may show up there; bytes taken from a
mapped /dev/shm file are not reads); ``device`` is the kernel's count of bytes the rank processes
made it fetch from the block device (``read_bytes``; what the page cache already held costs none,
so on one host it shows the storage traffic itself; a tmpfs root reads nothing). A load's wall is the slowest
rank's, from a common barrier. ``--cold`` drops the page cache before each load (needs root).
"""

from __future__ import annotations

import argparse
import os
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

WORLD = 4
CONTENDERS = ("shardckpt shared", "shardckpt unshared", "DCP")


def full_state(mib: int) -> dict:
    """The global tensors: a few large 2-D weights (rows divisible by 2 and 4) and a bias."""
    gen = torch.Generator().manual_seed(0)
    per = mib * (1 << 20) // 4 // 4
    cols = 1024
    rows = per // cols // 4 * 4 + 6  # shard edges fall inside chunks on 2 -> 4
    return {f"w{i}": torch.randn(rows, cols, generator=gen) for i in range(4)} | \
        {"bias": torch.randn(4096, generator=gen)}


def rank_state(shape: str, world: int, mib: int, zeros: bool) -> dict:
    """What a rank holds: plain tensors (DDP) or Shard(0) DTensors on a mesh of ``world``."""
    full = full_state(mib)
    if zeros:
        full = {k: torch.zeros_like(v) for k, v in full.items()}
    if shape == "ddp":
        return full
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = bh.cpu_mesh(world)
    return {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}


def _save_rank(rank, world, shape, mib, path, dcp_path):
    import torch.distributed.checkpoint as dcp
    state = rank_state(shape, world, mib, zeros=False)
    shardckpt.save(state, path, codec="raw")
    dcp.save(state, checkpoint_id=dcp_path)


def _io() -> tuple[int, int]:
    """This process's ``(rchar, read_bytes)`` from /proc/self/io: bytes read by system calls,
    and bytes it made the kernel fetch from the block device (0 for what the page cache held)."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["rchar"]), int(fields["read_bytes"])


class Requested:
    """Counts what shardckpt asks storage for in this process (patched in for the benchmark)."""

    def __init__(self):
        from shardckpt.format import opening
        from shardckpt.load import read, share
        from shardckpt.storage import WRAPPERS
        from shardckpt.storage.wrapper import StorageWrapper
        self.total = 0
        native, fetch, me = read.read_file_chunks, share.fetch, self
        to_file = share.fetch_to_file

        def read_file_chunks(source, reads, threads):
            me.total += sum(r[1] for r in reads)
            return native(source, reads, threads)

        def counted_fetch(source, offset, length, out):
            me.total += length
            return fetch(source, offset, length, out)

        def counted_to_file(source, offset, length, out_fd, at):
            me.total += length
            return to_file(source, offset, length, out_fd, at)

        class Counting(StorageWrapper):
            def read(self, path, offset=0, length=None):
                data = self.inner.read(path, offset, length)
                me.total += len(data)
                return data

        check = opening._check_file

        def check_file(real, f, label=None):
            me.total += 16
            return check(real, f, label)

        read.read_file_chunks, share.fetch, share.fetch_to_file, opening._check_file = \
            read_file_chunks, counted_fetch, counted_to_file, check_file
        WRAPPERS.append(lambda s: Counting(s))


def _load_rank(rank, world, shape, mib, path, dcp_path, reps, cold, local_world):
    import torch.distributed as dist
    if local_world:
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world)
    import torch.distributed.checkpoint as dcp
    counter = Requested()
    out = {c: [] for c in CONTENDERS}
    expect = rank_state(shape, world, mib, zeros=False)
    for rep in range(reps):
        for name in bh.rotated(list(CONTENDERS), rep):
            state = rank_state(shape, world, mib, zeros=True)
            os.environ["SHARDCKPT_SHARE_READS"] = "0" if name == "shardckpt unshared" else "1"
            if cold and rank == 0:
                bh.drop_page_cache()
            dist.barrier()
            counter.total, io0, t0 = 0, _io(), time.perf_counter()
            if name == "DCP":
                dcp.load(state, checkpoint_id=dcp_path)
            else:
                shardckpt.load(state, path)
            wall = time.perf_counter() - t0
            rchar, device = (b - a for a, b in zip(io0, _io()))
            ok = all(torch.equal(bh.local_part(state[k]), bh.local_part(expect[k])) for k in expect)
            out[name].append({"wall": wall, "requested": counter.total, "rchar": rchar,
                              "device": device, "ok": ok})
    return out


def run_shape(shape: str, save_world: int, mib: int, reps: int, cold: bool, root: str,
              local_world: int = 0):
    path, dcp_path = os.path.join(root, f"{shape}-sc"), os.path.join(root, f"{shape}-dcp")
    run_with_ranks(save_world, _save_rank, "ddp" if shape == "ddp" else shape, mib, path,
                   dcp_path, timeout=900) if save_world > 1 else \
        _save_single(shape, mib, path, dcp_path)
    size = bh.disk_bytes(path)
    dcp_size = bh.disk_bytes(dcp_path)
    results = run_with_ranks(WORLD, _load_rank, shape, mib, path, dcp_path, reps, cold,
                             local_world, timeout=1800)
    rows, medians = [], {}
    for name in CONTENDERS:
        reps_ = [[res.value[name][i] for res in results] for i in range(reps)]
        walls = [max(r["wall"] for r in rep) for rep in reps_]
        requested = bh.median([sum(r["requested"] for r in rep) for rep in reps_])
        rchar = bh.median([sum(r["rchar"] for r in rep) for rep in reps_])
        device = bh.median([sum(r["device"] for r in rep) for rep in reps_])
        ok = all(r["ok"] for rep in reps_ for r in rep)
        base = dcp_size if name == "DCP" else size
        medians[name] = bh.median(walls)
        rows.append([name, f"{bh.median(walls):.3f}", f"{min(walls):.2f}-{max(walls):.2f}",
                     f"{base:,}", "-" if name == "DCP" else f"{requested / base:.3f}",
                     f"{rchar / base:.3f}", f"{device / base:.3f}", "ok" if ok else "WRONG"])
    for row, name in zip(rows, CONTENDERS):
        row[3:3] = [f"{medians[name] / medians['DCP']:.2f}",
                    f"{medians[name] / medians['shardckpt unshared']:.2f}"]
    return rows


def _save_single(shape, mib, path, dcp_path):
    import torch.distributed.checkpoint as dcp
    state = rank_state(shape, 1, mib, zeros=False)
    shardckpt.save(state, path, codec="raw")
    dcp.save(state, checkpoint_id=dcp_path, no_dist=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cold", action="store_true")
    p.add_argument("--shapes", default="ddp,fsdp,reshard")
    p.add_argument("--local-world", type=int, default=0,
                   help="ranks per emulated node (default: all 4 on one node)")
    args = p.parse_args(argv)
    shapes = {"ddp": ("DDP replicated", 1), "fsdp": ("FSDP same world 4->4", WORLD),
              "reshard": ("reshard 2->4", 2)}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
        for key in args.shapes.split(","):
            title, save_world = shapes[key]
            rows = run_shape("ddp" if key == "ddp" else key, save_world, args.mib, args.reps,
                             args.cold, root, args.local_world)
            nodes = f"{WORLD // args.local_world} nodes x {args.local_world}" \
                if args.local_world else "1 node"
            print(f"\n{title}: {WORLD} loading ranks ({nodes}), {args.mib} MiB state, median of "
                  f"{args.reps}, {'cold' if args.cold else 'warm'} page cache")
            print(bh.table(["contender", "wall s", "min-max", "/DCP", "/unshared",
                            "checkpoint bytes",
                            "requested/size", "rchar/size", "device/size", "check"], rows),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
