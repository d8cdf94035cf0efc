"""launch/train.py end to end: preempted by SIGTERM, resumed on the same or another world size.

Tiny model flags keep each run to seconds; the runs are real processes (torchrun for 2 ranks)
and the signals real signals.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import shardckpt
from shardckpt.format.opening import open_for_read

TRAIN = str(Path(__file__).resolve().parents[2] / "launch" / "train.py")
TINY = ["--dim", "32", "--layers", "2", "--heads", "2", "--seq-len", "32",
        "--global-batch-size", "4", "--max-steps", "10", "--save-every", "3",
        "--corpus-bytes", "200000", "--keep-last", "2"]
LINE = re.compile(r"^step=(\d+) loss=(\S+)$", re.M)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def command(world: int, ckpt, *extra) -> list[str]:
    if world == 1:
        return [sys.executable, TRAIN, "--checkpoint-dir", str(ckpt), *TINY, *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={world}", TRAIN, "--checkpoint-dir", str(ckpt), *TINY, *extra]


def losses(text: str) -> dict[int, str]:
    return {int(s): loss for s, loss in LINE.findall(text)}


def run(world: int, ckpt, *extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(world, ckpt, *extra), capture_output=True, text=True,
                          env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def preempt(world: int, ckpt, *extra, whom: str = "group", after_step: int = 4):
    """Start a run, send SIGTERM once rank 0 printed ``after_step``: to the process group
    (``group``, as SLURM does) or to one training worker (``worker``). Returns (status,
    stdout)."""
    proc = subprocess.Popen(command(world, ckpt, "--step-sleep", "0.3", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(f"step={after_step} "):
                break
        if whom == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            import psutil
            workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                       if TRAIN in c.cmdline()]
            assert len(workers) == world
            workers[-1].send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, "".join(out) + rest, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs' loss lines, by (world, parallel), made on first use."""
    made = {}

    def get(world: int, parallel: str = "fsdp") -> dict[int, str]:
        if (world, parallel) not in made:
            ckpt = tmp_path_factory.mktemp(f"ref-{world}-{parallel}")
            made[world, parallel] = losses(run(world, ckpt, "--parallel", parallel).stdout)
            assert sorted(made[world, parallel]) == list(range(1, 11))
        return made[world, parallel]
    return get


def reason(path) -> str:
    m, _ = open_for_read(path)
    return m.metadata["shardckpt.manager"]["reason"]


def test_single_process_preempted_and_resumed_is_bit_exact(tmp_path, reference):
    status, out, err = preempt(1, tmp_path)
    assert status == shardckpt.EXIT_PREEMPTED, out + err
    before = losses(out)
    last = max(before)
    assert 4 <= last < 10 and reason(tmp_path / f"step-{last:08d}") == "preemption"
    after = losses(run(1, tmp_path).stdout)
    assert min(after) == last + 1
    assert {**before, **after} == reference(1)  # the same printed losses, bit for bit


def test_torchrun_group_sigterm_then_resume_on_one_rank(tmp_path, reference):
    status, out, err = preempt(2, tmp_path)
    assert status != 0 and "preempted: checkpoint" in out, out + err
    before = losses(out)
    last = max(before)
    assert reason(tmp_path / f"step-{last:08d}") == "preemption"
    assert err.count("received signal 15") >= 2  # each worker, the repeat ignored
    after = losses(run(1, tmp_path).stdout)
    ref = reference(2)
    assert all(before[s] == ref[s] for s in before)
    first = min(after)
    assert first == last + 1
    rel = abs(float(after[first]) - float(ref[first])) / float(ref[first])
    assert rel < 1e-5, (after[first], ref[first])


def test_torchrun_ddp_signal_to_one_worker_resumes_bit_exact(tmp_path, reference):
    status, out, err = preempt(2, tmp_path, "--parallel", "ddp", whom="worker")
    assert status != 0 and "preempted: checkpoint" in out, out + err
    before = losses(out)
    after = losses(run(2, tmp_path, "--parallel", "ddp").stdout)
    assert min(after) == max(before) + 1
    assert {**before, **after} == reference(2, "ddp")
