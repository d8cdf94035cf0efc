"""Exactly once, for real: launch/train.py under torchrun on 4 ranks gets SIGTERM (to the whole
process group, DataLoader workers included), resumes on 2, gets SIGTERM again, resumes on 3 and
runs to the end of the second epoch. Every rank records the sample indices of each step it
trained; every index of each epoch was trained on exactly once, every global batch is the one an
uninterrupted run takes, and no step was trained twice.

120 windows and a global batch of 12 (3, 6 and 4 per rank): 10 steps an epoch, 20 in all.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shardckpt.testing.records import exactly_once_problems, read_steps

TRAIN = str(Path(__file__).resolve().parents[2] / "launch" / "train.py")
WINDOWS, BATCH, SEQ = 120, 12, 32
FLAGS = ["--dim", "32", "--layers", "2", "--heads", "2", "--seq-len", str(SEQ),
         "--global-batch-size", str(BATCH), "--corpus-bytes", str(WINDOWS * (SEQ + 1)),
         "--max-steps", "20", "--save-every", "4", "--keep-last", "2"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
RESUMED = re.compile(r"^\[train\] resumed from \S+step-(\d+) at world size (\d+)$", re.M)


def torchrun(world: int, ckpt, records, workers: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={world}", TRAIN, "--checkpoint-dir", str(ckpt), *FLAGS,
            "--record-indices", str(records), "--data-workers", str(workers)]


def run_until(cmd: list[str], after_step: int | None) -> tuple[int, str]:
    """Run ``cmd``; once rank 0 printed ``after_step`` SIGTERM its whole process group.
    Returns (exit status, stdout)."""
    proc = subprocess.Popen(cmd + ["--step-sleep", "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if after_step is not None and line.startswith(f"step={after_step} "):
                os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, "".join(out)


@pytest.mark.parametrize("workers", [2, pytest.param(0, marks=pytest.mark.slow)])
def test_4_ranks_then_2_then_3_through_two_epochs_train_on_each_sample_once(tmp_path, workers):
    ckpt, records = tmp_path / "ckpt", tmp_path / "records"
    outs = []
    for world, stop in ((4, 6), (2, 14), (3, None)):
        code, out = run_until(torchrun(world, ckpt, records, workers), stop)
        if stop is None:
            assert code == 0, out[-3000:]
        else:  # torchrun reports its workers' 75 as a failure of its own
            assert code != 0 and "preempted: checkpoint" in out, out[-3000:]
        outs.append(out)
    assert [int(w) for o in outs for _, w in RESUMED.findall(o)] == [2, 3]
    steps, trained = read_steps(records)
    assert sorted(steps) == list(range(1, 21)) and set(trained.values()) == {1}  # none lost
    assert {s.world for s in steps.values()} == {4, 2, 3}
    for step in steps.values():
        assert {len(own) for own in step.ranks.values()} == {BATCH // step.world}
    assert exactly_once_problems(records, WINDOWS, BATCH, epochs=2) == []


def test_the_check_sees_a_repeated_and_a_skipped_batch(tmp_path):
    """The records' check is not vacuous: a resume that trained a batch again, and so never
    reached the epoch's last one, is reported."""
    from shardckpt.testing.records import Recorder
    import torch
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0)).tolist()
    good = Recorder(tmp_path, 1, 0, 1)
    for k in range(2):
        good.record(k + 1, 0, order[k * 12:(k + 1) * 12])
    good.file.close()
    assert exactly_once_problems(tmp_path, 24, 12, epochs=1) == []
    bad = Recorder(tmp_path, 2, 0, 1)
    bad.record(2, 0, order[:12])  # a later incarnation trained step 2 on step 1's batch
    bad.file.close()
    problems = exactly_once_problems(tmp_path, 24, 12, epochs=1)
    assert any("step 2" in p for p in problems) and any("12 repeated" in p for p in problems)
