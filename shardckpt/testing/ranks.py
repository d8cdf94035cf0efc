"""``run_with_ranks``: run a function on N gloo ranks in fresh processes, collect the results.

Children come from a forkserver that has imported torch once, so a rank starts in a fraction of a
second and never inherits the test process's threads. Each child joins a TCP-store process group
on loopback, runs ``fn(rank, world, *args)`` and reports its return value or its exception
(as text, with the traceback). A child may also end itself (``os._exit``) to play a dead rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # torch.distributed.tensor too: its import is most of a first save's cost (~0.5-1.5 s).
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor",
                                     "shardckpt"])
    return _CTX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error: str | None = None        # "TypeName: message"
    error_type: str | None = None
    traceback: str | None = None
    exitcode: int | None = None


@dataclass
class _TensorBytes:
    """A tensor sent by value: torch would otherwise share its memory through a file descriptor
    that dies with the child."""

    dtype: str
    shape: tuple
    data: bytes

    def unpack(self):
        import torch
        dtype = getattr(torch, self.dtype)
        flat = torch.frombuffer(bytearray(self.data), dtype=torch.uint8) if self.data else \
            torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(self.shape).clone()


def _pack(obj):
    import torch
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return _TensorBytes(str(t.dtype).removeprefix("torch."), tuple(t.shape), data)
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v) for v in obj)
    return obj


def _unpack(obj):
    if isinstance(obj, _TensorBytes):
        return obj.unpack()
    if isinstance(obj, dict):
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v) for v in obj)
    return obj


def _child(fn, rank, world, port, args, queue, released):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        queue.put(RankResult(rank, value=_pack(fn(rank, world, *args))))
    except BaseException as exc:  # reported to the parent, which decides
        queue.put(RankResult(rank, error=f"{type(exc).__name__}: {exc}",
                             error_type=type(exc).__name__, traceback=traceback.format_exc()))
    queue.close()
    queue.join_thread()  # the result must leave before the hard exit below
    if rank == 0:
        # Rank 0 hosts the c10d store: leaving before the others have finished their last
        # store request would fail them with a reset connection. The parent releases it once
        # every rank has reported or died.
        released.wait(300)
    # Skip interpreter teardown: a peer that died mid-test must not make this rank hang in
    # process-group destruction.
    os._exit(0)


def run_with_ranks(world: int, fn: Callable, *args, timeout: float = 120.0,
                   expect_errors: bool = False) -> list[RankResult]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; their results in rank order.

    ``fn`` must be importable (a module-level function). Unless ``expect_errors``, any rank's
    exception or abnormal exit fails with every rank's traceback.
    """
    ctx = _context()
    queue, port, released = ctx.Queue(), free_port(), ctx.Event()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, queue, released),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout
    while len(results) < world and time.monotonic() < deadline:
        try:
            res = queue.get(timeout=0.1)
            res.value = _unpack(res.value)
            results[res.rank] = res
        except queue_mod.Empty:
            if queue.empty() and all(r in results or not p.is_alive()
                                     for r, p in enumerate(procs)):
                break
    released.set()
    for p in procs:
        p.join(max(deadline - time.monotonic(), 1.0))
        if p.is_alive():
            p.kill()
            p.join()
    out = []
    for r, p in enumerate(procs):
        res = results.get(r, RankResult(r, error=f"exited with code {p.exitcode} without a "
                                                 "result", error_type="Died"))
        res.exitcode = p.exitcode
        out.append(res)
    if not expect_errors and any(res.error for res in out):
        raise AssertionError("\n".join(f"rank {res.rank}: {res.error}\n{res.traceback or ''}"
                                       for res in out if res.error))
    return out
