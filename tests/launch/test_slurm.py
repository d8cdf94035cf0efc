"""launch/slurm.sbatch under a real slurmctld: two slurmd nodes on network-namespace hosts.

The job trains on 2 nodes x 2 processes, is preempted with ``scancel --signal=TERM`` (SIGTERM to
every process of the job's steps, as a preemption or the time limit's ``--signal`` does): every
worker saves, torchrun.sh exits 75 on each node, the batch script requeues the job, which
resumes from the preemption checkpoint and finishes with the uninterrupted run's losses, bit
for bit. (With ``--full`` srun gets the signal too, and srun answers SIGTERM by killing its step:
the job then requeues and resumes from the last periodic checkpoint; see docs/guide.md.) Skipped,
with the reason, where slurm-wlm and munge cannot be installed or hosts cannot be made.
"""

import time

import pytest

from shardckpt.testing import elastic
from shardckpt.testing.elastic import losses
from tests.launch.conftest import make_hosts

STEPS = 24
FLAGS = [*elastic.TINY, "--max-steps", str(STEPS), "--save-every", "5", "--step-sleep", "0.2"]


@pytest.fixture
def cluster(tmp_path):
    """A 2-node SLURM cluster, stopped (and its hosts removed) after the test."""
    from shardckpt.testing.slurm import SlurmCluster, unavailable
    hosts = make_hosts(2, tmp_path / "hosts")
    try:
        reason = unavailable()
        if reason:
            pytest.skip(reason)
        with SlurmCluster(hosts, tmp_path / "slurm") as c:
            yield c
    finally:
        hosts.close()


def wait_state(cluster, job_id, want, timeout):
    deadline = time.monotonic() + timeout
    while True:
        state = cluster.job_state(job_id)
        if want(state):
            return state
        assert time.monotonic() < deadline, (state, cluster.run(["scontrol", "show", "job",
                                                                  job_id]).stdout)
        time.sleep(1)


@pytest.mark.slow  # about 2-3 minutes on two loaded cores: scripts/slurm_local.sh --test runs it
def test_sbatch_preempted_requeues_resumes_and_finishes_bit_exact(cluster, tmp_path):
    hosts = cluster.hosts
    ref_hosts_ckpt = hosts.shared / "reference"
    reference = elastic.reference_losses(hosts[0], ref_hosts_ckpt, tmp_path, 4, FLAGS)
    out = hosts.shared / "job.out"
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "NPROC": "2", "GRACE": "40",
           "PYTHON": elastic.sys.executable}
    sub = cluster.run(["sbatch", "--parsable", "--nodes", "2", "--output", str(out),
                       "launch/slurm.sbatch", "--checkpoint-dir", str(hosts.shared / "ckpt"),
                       *FLAGS], env={**cluster.env, **env})
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 180
    while "step=6 " not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
        time.sleep(0.5)
    t0 = time.monotonic()
    cancel = cluster.run(["scancel", "--signal=TERM", job])
    assert cancel.returncode == 0, cancel.stderr
    wait_state(cluster, job, lambda s: s[1] == 1 and s[0] == "PENDING", 240)
    # slurmctld holds a requeued job for 120 s (its BeginTime); start it now instead.
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    state, restarts = wait_state(cluster, job, lambda s: s[0] == "COMPLETED", 300)
    print(f"preempted to completed: {time.monotonic() - t0:.0f} s")
    text = out.read_text()
    assert "attempt ended with status 75 (preempted: 1): requeueing" in text, text
    assert restarts == 1, text
    assert "requeueing" in text and "training finished" in text, text
    got = losses(text)
    resumed = elastic.resumes(text)
    assert len(resumed) == 1 and resumed[0][1] == 4, text
    # the preemption checkpoint (retention removed it by the end of the run)
    assert f"preempted: checkpoint {hosts.shared / 'ckpt'}/step-{resumed[0][0]:08d} committed" \
        in text, text
    assert {s for s, _ in got} == set(range(1, STEPS + 1))
    assert all(x == reference[s] for s, x in got), elastic.worst_difference(got, reference)
