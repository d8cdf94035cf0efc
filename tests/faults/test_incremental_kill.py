"""kill -9 of a process whose CheckpointManager saves incrementally and deletes old checkpoints
(retire + sweep) in a loop: every checkpoint still committed afterwards loads bit-exactly, its
references included, and a later gc leaves them so."""

import os
import random
import signal
import time

import torch

import shardckpt
from shardckpt.manage import layout
from shardckpt.storage import LocalStorage
from shardckpt.testing.ranks import _context
from tests.helpers import trials

FROZEN_SEED = 7


def expected(step: int) -> dict:
    gen = torch.Generator().manual_seed(FROZEN_SEED)
    frozen = torch.randn(3000, generator=gen)  # the same at every step: always referenced
    live = torch.arange(2000, dtype=torch.float32) + step
    sparse = torch.zeros(3000)
    sparse[: 1000 * (step % 3)] = step  # changes some chunks, keeps others
    return {"frozen": frozen, "live": live, "sparse": sparse, "step": step}


def _loop(root: str, log: str) -> None:
    with shardckpt.CheckpointManager(root, keep_last=2, incremental=True, async_save=False,
                                     handle_preemption=False,
                                     save_options={"chunk_bytes": 2048}) as mgr:
        for step in range(1, 100_000):
            mgr.save(step, expected(step))
            with open(log, "a") as f:
                f.write(f"{step}\n")


def _trial(workdir, rng) -> tuple[int, int]:
    root, log = os.path.join(workdir, "ckpts"), os.path.join(workdir, "log")
    os.makedirs(root)
    proc = _context().Process(target=_loop, args=(root, log), daemon=True)
    proc.start()
    deadline = time.monotonic() + 120
    while not os.path.exists(log) and time.monotonic() < deadline and proc.is_alive():
        time.sleep(0.005)
    time.sleep(rng.uniform(0.05, 1.0))
    proc.kill()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    with open(log) as f:
        saved = [int(line) for line in f if line.strip()]
    storage = LocalStorage(root)
    committed = [e for e in layout.entries(storage) if e.committed]
    for round_ in range(2):  # as the kill left it, then after a gc finished the deletions
        for e in committed:
            assert shardckpt.verify(os.path.join(root, e.name)).ok
            loaded = shardckpt.load_full(os.path.join(root, e.name))
            want = expected(e.step)
            assert all(torch.equal(loaded[k], want[k]) for k in ("frozen", "live", "sparse"))
        layout.collect_garbage(storage, older_than=0)
        committed = [e for e in layout.entries(storage) if e.committed]
    assert max(saved) in {e.step for e in committed}  # the newest returned save is kept
    return len(saved), len(committed)


def test_kill_9_during_incremental_saves_and_retention(tmp_path):
    rng, saves = random.Random(20261201), 0
    for i in range(trials(3, 30)):
        n, kept = _trial(str(tmp_path / f"trial-{i}"), rng)
        saves += n
        assert kept >= 1
    assert saves >= 6  # the kills landed after several saves and deletions
