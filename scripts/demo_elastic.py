"""The elastic demo's driver (run it through scripts/demo_elastic.sh, as root).

Two network-namespace hosts of two workers each train launch/train.py under launch/torchrun.sh
with NNODES=1:2. Job 1: (a) host1 is lost (SIGKILL to all its processes, or its link cut with
HOW=cut) and host0 goes on at world 2; (b) host1 comes back and the job grows to world 4;
(c) every host gets SIGTERM: one checkpoint commits, the workers exit 75, the agents exit;
host0 alone restarts the job and finishes it. Job 2: (d) host1 dies in the middle of a save:
nothing commits, host0's ranks raise RankFailureError, its agent restarts and resumes from the
previous checkpoint. Every loss printed is compared with an uninterrupted world-4 run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from shardckpt.testing import elastic
from shardckpt.testing.elastic import Job, losses, resumes
from shardckpt.testing.hosts import Hosts, remove_stale, unavailable

STEPS = int(os.environ.get("STEPS", "40"))
FLAGS = [*elastic.TINY, "--max-steps", str(STEPS), "--save-every", "5", "--step-sleep", "0.1"]


def say(t0: float, msg: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)


def job1(hosts: Hosts, out: Path, t0: float, how: str) -> Job:
    a, b = hosts
    hold = out / "hold"
    job = Job(hosts, out / "job1", [*FLAGS, "--hold-file", str(hold)], PG_TIMEOUT="15")
    job.start(a), job.start(b)
    job.wait_for(r"^step=7 ", 240)
    say(t0, f"job 1 at world 4; (a) losing host1 ({how})")
    step = elastic.lose_host(job, b, how)
    say(t0, f"host0 resumed from step {step} at world 2")
    hold.touch()
    job.wait_for(rf"^step={step + 2} ", 120)
    say(t0, "(b) host1 comes back")
    world = elastic.grow(job, b, old_world=2)
    hold.unlink()
    say(t0, f"grown: resumed at world {world}")
    job.wait_for(rf"^step={STEPS * 3 // 4} ", 240)
    say(t0, "(c) SIGTERM to every process of both hosts")
    statuses = elastic.preempt_all(job)
    say(t0, f"torchrun.sh exit statuses: {statuses}")
    final = job.start(a)
    status = final.wait(300)
    say(t0, f"host0 alone restarted the job: exit {status}")
    return job


def job2(hosts: Hosts, out: Path, t0: float) -> Job:
    a, b = hosts
    stall = out / "stall"
    stall.mkdir()
    job = Job(hosts, out / "job2", [*FLAGS, "--sync-save"],
              TRAIN="shardckpt/testing/train_stalled.py", SHARDCKPT_STALL_HOST=b.hostname,
              SHARDCKPT_STALL_SAVE="2", SHARDCKPT_STALL_DIR=str(stall))
    job.start(a), job.start(b)
    say(t0, "job 2: (d) host1 dies in its second save")
    step = elastic.die_mid_save(job, b, stall)
    committed = elastic.checkpoint_committed(job.ckpt, 10)
    say(t0, f"survivors raised RankFailureError; step-10 committed: {committed}; "
            f"resumed from step {step}")
    status = job.agents[0].wait(300)
    say(t0, f"host0 finished alone: exit {status}")
    return job


def report(name: str, job: Job, reference: dict) -> bool:
    got = losses(*job.texts())
    worst = elastic.worst_difference(got, reference)
    steps = {s for s, _ in got}
    print(f"{name}: resumes (checkpoint step, world size) {resumes(*job.texts())}; "
          f"{len(got)} losses printed over steps {min(steps)}-{max(steps)}; largest relative "
          f"difference from the uninterrupted run {worst:.1e}")
    return worst < 1e-6 and steps == set(range(1, STEPS + 1))


def main(out: Path) -> int:
    reason = unavailable()
    if reason:
        print(f"demo_elastic: {reason}", file=sys.stderr)
        return 2
    remove_stale()
    t0 = time.monotonic()
    with Hosts(1, root=out / "ref") as one:
        reference = elastic.reference_losses(one[0], one.shared / "ckpt", out, 4, FLAGS)
    say(t0, f"reference: {STEPS} steps at world 4, uninterrupted")
    ok = True
    with Hosts(2, root=out / "hosts1") as hosts:
        ok &= report("job 1", job1(hosts, out, t0, os.environ.get("HOW", "kill")), reference)
    with Hosts(2, root=out / "hosts2") as hosts:
        ok &= report("job 2", job2(hosts, out, t0), reference)
    print("every resumed loss equals the uninterrupted run's within 1e-6:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-elastic-out").resolve()))
