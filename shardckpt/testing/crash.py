"""kill -9 at a random instant: a process (or one rank of two) saving in a loop is SIGKILLed,
then every checkpoint it left behind is judged.

The judgement (``judge``) is the promise of the commit protocol: a checkpoint whose save
returned loads bit-exactly; any other folder either loads bit-exactly too (the kill came after
the rename) or raises a ``CheckpointError``; ``latest`` (overwritten by every save) always holds
the last or the next step, never a mix and never nothing. Anything else is *lost*.

The savers log each step after its save returned, so the judge knows what was committed. The
tests run a bounded sample of trials; ``scripts/soak_faults.py`` runs hundreds.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter

import torch

from ..errors import CheckpointError

# committed-ok: a save that returned, loaded bit-exactly; inflight-ok: a folder of the save that
# was killed (or the checkpoint ``latest``), loaded bit-exactly; detected: such a folder refused
# with a CheckpointError; lost: a committed checkpoint missing, refused or wrong, or any folder
# that loads wrong values; escaped: an exception that is not a CheckpointError.
OUTCOMES = ("committed-ok", "inflight-ok", "detected", "lost", "escaped")


def expected_state(step: int, seed: int, rank: int | None = None) -> dict:
    """The state saved at ``step``: small, a few chunks, values unique to (seed, step, rank)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    state = {"w": torch.randn(48, 32, generator=gen).to(torch.bfloat16),
             "b": torch.randn(200, generator=gen),
             "n": torch.arange(step, step + 64, dtype=torch.int64), "step": step}
    if rank is not None:  # differs per rank: stored per rank, loaded with load_full(rank=r)
        state["own"] = torch.full((16,), float(rank * 100_000 + step))
    return state


def _log(log: str, line: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one small append: whole or absent after a kill
    finally:
        os.close(fd)


def save_loop(root: str, log: str, seed: int, rank: int | None = None, steps: int = 100_000,
              timeout: float | None = None, on_ready=None) -> None:
    """Save step after step to ``root/step-NNNNN`` and overwrite ``root/latest``; log each.
    A first save outside ``root`` warms the process up (the first save costs ~100x the next
    ones) before ``ready`` is logged and ``on_ready()`` called."""
    import shardckpt
    kw = {"timeout": timeout} if timeout else {}
    shardckpt.save(expected_state(0, seed, rank), root + ".warmup", overwrite=True, **kw)
    _log(log, "ready")
    if on_ready is not None:
        on_ready()
    for step in range(steps):
        state = expected_state(step, seed, rank)
        shardckpt.save(state, os.path.join(root, f"step-{step:05d}"), codec="auto",
                       chunk_bytes=1024, **kw)
        _log(log, f"saved {step}")
        shardckpt.save(state, os.path.join(root, "latest"), overwrite=True, codec="zstd",
                       chunk_bytes=2048, **kw)
        _log(log, f"latest {step}")


def read_log(log: str) -> tuple[set[int], int | None]:
    """Steps whose save returned, and the last step ``latest`` was overwritten with."""
    saved, latest = set(), None
    if os.path.exists(log):
        for line in open(log).read().splitlines():
            what, _, n = line.partition(" ")
            if what == "saved":
                saved.add(int(n))
            elif what == "latest":
                latest = int(n)
    return saved, latest


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _step_of(name: str) -> int | None:
    """The step a folder name refers to (``step-00012``, ``.step-00012.tmp-...``), if any."""
    body = name.lstrip(".").split(".")[0]
    return int(body[5:]) if body.startswith("step-") and body[5:].isdigit() else None


def judge(root: str, saved: set[int], latest: int | None, seed: int,
          ranks: tuple = (None,)) -> Counter:
    """Outcome counts for every folder under ``root`` (see the module docstring)."""
    import shardckpt
    out: Counter = Counter()

    def check(path, allowed: set[int], committed: bool) -> None:
        try:
            loaded = [shardckpt.load_full(path, rank=r or 0) for r in ranks]
        except CheckpointError:
            out["lost" if committed else "detected"] += 1
            return
        except Exception:  # noqa: BLE001 - anything but a CheckpointError breaks the promise
            out["escaped"] += 1
            return
        step = loaded[0].get("step") if isinstance(loaded[0], dict) else None
        good = step in allowed and all(_same(expected_state(step, seed, r), got)
                                       for r, got in zip(ranks, loaded))
        out[("committed-ok" if committed else "inflight-ok") if good else "lost"] += 1

    names = sorted(os.listdir(root))
    for name in names:
        path = os.path.join(root, name)
        step = _step_of(name)
        if name == "latest" and latest is not None:  # its last overwrite returned
            try:
                current = shardckpt.load_full(path)["step"]
            except Exception:  # noqa: BLE001 - check() below classifies it
                current = None
            check(path, {latest, latest + 1}, committed=current == latest)
        elif name == "latest":
            check(path, {0}, committed=False)
        elif name.startswith(".latest"):  # a replacement in flight, or the old one set aside
            check(path, {latest, (latest + 1) if latest is not None else 0, *saved},
                  committed=False)
        elif step is not None:
            check(path, {step}, committed=step in saved and not name.startswith("."))
    for step in saved:  # a save that returned must have left its folder
        if f"step-{step:05d}" not in names:
            out["lost"] += 1
    if latest is not None and "latest" not in names:
        out["lost"] += 1
    return out


def _ctx():
    from .ranks import _context
    return _context()


def _wait_for_a_save_in_flight(root: str, limit: float = 1.0) -> None:
    """Return once a save's temporary folder (a dot name) shows under ``root``, or after
    ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if any(name.startswith(".") for name in os.listdir(root)):
            return
        time.sleep(0.0005)


def kill_single(workdir: str, seed: int, rng: random.Random, window: float = 0.6,
                inside: bool = False) -> Counter:
    """One trial: a process saves in a loop; SIGKILL it ``uniform(0, window)`` s after its first
    save began (``inside``: at the first moment after that when a save is seen in flight, since
    these tiny saves fill only part of the loop); judge what it left."""
    root, log = os.path.join(workdir, "ckpts"), os.path.join(workdir, "progress.log")
    os.makedirs(root)
    proc = _ctx().Process(target=save_loop, args=(root, log, seed), daemon=True)
    proc.start()
    deadline = time.monotonic() + 120
    while not os.path.exists(log) and time.monotonic() < deadline and proc.is_alive():
        time.sleep(0.005)
    time.sleep(rng.uniform(0, window))
    if inside:
        _wait_for_a_save_in_flight(root)
    proc.kill()  # SIGKILL
    proc.join()
    if proc.exitcode != -signal.SIGKILL:
        raise RuntimeError(f"the saving process ended on its own (exit code {proc.exitcode})")
    saved, latest = read_log(log)
    return judge(root, saved, latest, seed)


def _rank_loop(rank, world, root, seed, victim, after, timeout):
    """A rank of a 2-rank trial: once warm, the victim SIGKILLs itself ``after`` s later (from a
    timer thread, so the instant is arbitrary); the survivor saves until a save raises
    RankFailureError, and reports how long after the kill that was."""
    import shardckpt
    log = os.path.join(os.path.dirname(root), f"progress-{rank}.log")
    started = []

    def arm():
        started.append(time.monotonic())
        if rank == victim:
            threading.Timer(after, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    try:
        save_loop(root, log, seed, rank, timeout=timeout, on_ready=arm)
    except shardckpt.RankFailureError as exc:
        return {"failed": sorted(exc.failures),
                "seconds": time.monotonic() - started[0] - after if started else None}
    return {"failed": [], "seconds": None}


def kill_rank(workdir: str, seed: int, rng: random.Random, timeout: float = 4.0,
              window: float = 0.8, victim: int | None = None) -> tuple[Counter, dict]:
    """One trial on 2 gloo ranks: SIGKILL one rank at a random instant. Returns the outcome
    counts and the survivor's report (which ranks it blamed, seconds from the kill to its
    RankFailureError)."""
    from .ranks import run_with_ranks
    root = os.path.join(workdir, "ckpts")
    os.makedirs(root)
    victim = rng.randrange(2) if victim is None else victim
    results = run_with_ranks(2, _rank_loop, root, seed, victim, rng.uniform(0.3, 0.3 + window),
                             timeout, expect_errors=True, timeout=4 * timeout + 90)
    survivor = results[1 - victim]
    saved: set[int] = set()
    latest = None
    for r in range(2):
        s, lt = read_log(os.path.join(workdir, f"progress-{r}.log"))
        saved |= s
        latest = lt if latest is None or (lt is not None and lt > latest) else latest
    out = judge(root, saved, latest, seed, ranks=(0, 1))
    report = {"victim": victim, "survivor_error": survivor.error, **(survivor.value or {})}
    if survivor.error:
        report["survivor_traceback"] = survivor.traceback
    if survivor.error or victim not in report.get("failed", []):
        out["escaped"] += 1  # the survivor did not raise RankFailureError naming the victim
    return out, report
