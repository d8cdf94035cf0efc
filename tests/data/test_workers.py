"""DataLoader workers and a process-group SIGTERM, in real processes: tracked loaders' workers
survive the signal (the loop goes on to save), and a process that then exits on an exception
still ends them instead of hanging; an unshielded loader crashes the loop, as it did in
launch/train.py before."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time


SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from torch.utils.data import DataLoader
    from shardckpt.data import DistributedSampler

    class Slow(torch.utils.data.Dataset):
        def __len__(self): return 400
        def __getitem__(self, i): time.sleep(0.002); return i

    signal.signal(signal.SIGTERM, lambda *a: print("trainer noted SIGTERM", flush=True))
    sampler = DistributedSampler(Slow(), 1, 0)
    loader = DataLoader(Slow(), batch_size=4, sampler=sampler, num_workers=2)
    batches = sampler.track(loader) if sys.argv[1] == "track" else iter(loader)
    next(batches)
    os.killpg(0, signal.SIGTERM)          # the scheduler signals the whole group
    for n in range(20):
        next(batches)
        time.sleep(0.01)
    print("20 batches after the signal", flush=True)
    raise RuntimeError("the loop fails after the save")
""")


def run(mode: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                          timeout=90, start_new_session=True)
    return proc, time.monotonic() - t0


def test_tracked_workers_outlive_a_group_sigterm_and_end_with_an_exiting_process():
    proc, took = run("track")
    assert "20 batches after the signal" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 1 and "the loop fails after the save" in proc.stderr
    assert took < 30, took  # multiprocessing's exit handler did not wait on ignoring workers


def test_unshielded_workers_die_of_it_and_the_loop_crashes():
    proc, _ = run("plain")
    assert "20 batches after the signal" not in proc.stdout
    assert "DataLoader worker" in proc.stderr, proc.stderr[-2000:]  # killed, or exited
