"""Elastic training across network-namespace hosts: hosts lost (killed, cut off, dead in the
middle of a save), hosts coming back, preemption of every host; every resume's losses equal
an uninterrupted run's.

Two hosts of two workers each run launch/torchrun.sh with ``NNODES=1:2``. The default run is
one bounded job that goes through every scenario once (a host dies mid-save, it comes back,
every host is preempted, one host restarts it); the ``slow`` tests run each scenario alone and
the faults (a link cut, a host that never returns, an unreachable rendezvous).
"""

import time

import pytest

from shardckpt.testing import elastic
from shardckpt.testing.elastic import Job, checkpoint_committed, losses, resumes

STEPS = 30
FLAGS = [*elastic.TINY, "--max-steps", str(STEPS), "--save-every", "4", "--step-sleep", "0.1"]
TOLERANCE = 1e-6  # relative, against the uninterrupted run at the same step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's loss per step, world size 4 on one host."""
    from tests.launch.conftest import make_hosts
    root = tmp_path_factory.mktemp("reference")
    with make_hosts(1, root / "hosts") as hosts:
        return elastic.reference_losses(hosts[0], hosts.shared / "ckpt", root, 4, FLAGS)


def assert_matches(job: Job, reference) -> None:
    got = losses(*job.texts())
    assert {s for s, _ in got} == set(range(1, STEPS + 1))
    assert elastic.worst_difference(got, reference) < TOLERANCE


def test_host_dies_mid_save_returns_and_every_host_is_preempted(two_hosts, tmp_path, reference):
    a, b = two_hosts
    stall, hold = two_hosts.shared / "stall", tmp_path / "hold"
    stall.mkdir()
    job = Job(two_hosts, tmp_path / "logs", [*FLAGS, "--sync-save", "--hold-file", str(hold)],
              TRAIN="shardckpt/testing/train_stalled.py", SHARDCKPT_STALL_HOST=b.hostname,
              SHARDCKPT_STALL_SAVE="2", SHARDCKPT_STALL_DIR=str(stall))
    job.start(a), job.start(b)
    # (d, a) b dies in its second save (step 8): nothing commits, a resumes from step 4 at 2.
    t0 = time.monotonic()
    assert elastic.die_mid_save(job, b, stall) == 4
    assert not checkpoint_committed(job.ckpt, 8)
    assert "RankFailureError" in job.agents[0].text()
    hold.touch()  # a waits at world 2 (after a step or more) until b is back
    job.wait_for(r"^step=[5-9] ", 120)
    # (b) b comes back: a's agent restarts the group (a saves first), world 4 again.
    assert elastic.grow(job, b, old_world=2) == 4
    hold.unlink()
    # (c) every host is preempted: one committed checkpoint, workers exit 75, agents exit.
    job.wait_for(r"^step=1[6-9] |^step=2\d ", 120)
    statuses = elastic.preempt_all(job)
    assert set(statuses.values()) == {75}, statuses
    # One host restarts the job alone: it resumes at world 2 and finishes.
    last = resumes(*job.texts())
    final = job.start(a)
    assert final.wait(240) == 0, elastic.tail(final.text())
    worlds = [w for _, w in resumes(*job.texts())]
    assert worlds == [2, 4, 2], worlds
    assert len(resumes(*job.texts())) == len(last) + 1
    assert_matches(job, reference)
    print(f"elastic job: {time.monotonic() - t0:.0f} s")
