"""Elastic training jobs on network-namespace hosts: start ``launch/torchrun.sh`` agents on
:class:`~shardckpt.testing.hosts.Host` s, wait for what they print, and compare their losses.

Used by tests/launch/test_elastic.py and scripts/demo_elastic.sh. Every agent's stdout and
stderr go to a log file of its own (``<logs>/<name>.log``); rank 0 of each worker group prints
``step=<n> loss=<x>`` lines, and rank 0 may sit on any host, so losses are gathered from every
agent's log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .hosts import Host

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
LINE = re.compile(r"^step=(\d+) loss=(\S+)$", re.M)
RESUMED = re.compile(r"^\[train\] resumed from \S+step-(\d+) at world size (\d+)$", re.M)
#: A model small enough for many restarts on two cores; the global batch divides 1, 2 and 4.
TINY = ["--dim", "32", "--layers", "2", "--heads", "2", "--seq-len", "32",
        "--global-batch-size", "4", "--corpus-bytes", "200000", "--keep-last", "3"]


class ElasticError(AssertionError):
    """An elastic job did not do what it was expected to within its time (with its logs)."""


def job_env(master: Host, rdzv_id: str, **extra: str) -> dict:
    """The environment of an agent of a 1:2-node job whose rendezvous store is on ``master``;
    short timeouts for tests and demos (``extra`` overrides)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable, "NPROC": "2", "NNODES": "1:2",
           "MASTER_ADDR": master.hostname, "MASTER_PORT": "29500", "RDZV_ID": rdzv_id,
           "RDZV_LAST_CALL_TIMEOUT": "2", "RDZV_JOIN_TIMEOUT": "90", "RDZV_READ_TIMEOUT": "20",
           "RDZV_KEEP_ALIVE": "2", "MONITOR_INTERVAL": "1", "GRACE": "30", "PG_TIMEOUT": "20",
           "SHARDCKPT_DIST_TIMEOUT": "20", "MAX_RESTARTS": "3"}
    env.update(extra)
    return env


class Agent:
    """One ``launch/torchrun.sh`` running on one host, logging to ``<logs>/<name>.log``."""

    def __init__(self, host: Host, name: str, logs: Path, env: dict, args: list[str]):
        self.host, self.name = host, name
        self.log = Path(logs) / f"{name}.log"
        with open(self.log, "w") as out:
            self.proc = host.popen(["bash", str(TORCHRUN_SH), *args], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=REPO)

    def text(self) -> str:
        """Everything the agent and its workers printed so far."""
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """The agent's exit status; raises ElasticError when it runs past ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ElasticError(f"{self.name} still running after {timeout:g} s:\n"
                               f"{tail(self.text())}") from None


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def wait_for(agents: list[Agent], pattern: str, timeout: float) -> re.Match:
    """The first match of ``pattern`` (multiline regex) in any agent's log, waiting up to
    ``timeout`` seconds; raises ElasticError (with the logs' tails) when it does not come."""
    regex = re.compile(pattern, re.M)
    deadline = time.monotonic() + timeout
    while True:
        for agent in agents:
            m = regex.search(agent.text())
            if m:
                return m
        if time.monotonic() > deadline or all(a.proc.poll() is not None for a in agents):
            logs = "\n".join(f"--- {a.name} (exit {a.proc.poll()})\n{tail(a.text())}"
                             for a in agents)
            raise ElasticError(f"no {pattern!r} within {timeout:g} s:\n{logs}")
        time.sleep(0.2)


def checkpoint_committed(ckpt: Path, step: int) -> bool:
    """The manager's checkpoint of ``step`` under ``ckpt`` has committed."""
    return (Path(ckpt) / f"step-{step:08d}" / "manifest.json").exists()


def losses(*texts: str) -> list[tuple[int, float]]:
    """Every ``(step, loss)`` printed, in order (steps repeat after a resume)."""
    return [(int(s), float(x)) for text in texts for s, x in LINE.findall(text)]


def resumes(*texts: str) -> list[tuple[int, int]]:
    """Every resume printed: ``(checkpoint step, world size)``."""
    return [(int(s), int(w)) for text in texts for s, w in RESUMED.findall(text)]


def worst_difference(got: list[tuple[int, float]], reference: dict[int, float]) -> float:
    """The largest relative difference of a printed loss from the reference's at its step."""
    missing = sorted({s for s, _ in got} - set(reference))
    if missing:
        raise ElasticError(f"steps {missing} are not in the reference run")
    return max((abs(x - reference[s]) / abs(reference[s]) for s, x in got), default=0.0)


def reference_losses(host: Host, ckpt: Path, logs: Path, world: int, flags: list[str],
                     timeout: float = 300) -> dict[int, float]:
    """An uninterrupted run on one host with ``world`` ranks: its loss at every step."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = host.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc-per-node={world}", str(REPO / "launch" / "train.py"),
                     "--checkpoint-dir", str(ckpt), *flags], timeout=timeout, env=env, cwd=REPO)
    Path(logs, f"reference-{world}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise ElasticError(f"reference run failed ({proc.returncode}):\n"
                           f"{tail(proc.stdout + proc.stderr)}")
    return dict(losses(proc.stdout))


class Job:
    """One elastic job: its agents on hosts, its checkpoint folder and its logs.

    Args:
        hosts: the :class:`~shardckpt.testing.hosts.Hosts`; the first hosts the rendezvous.
        logs: folder for the agents' logs.
        flags: launch/train.py flags (``--checkpoint-dir`` is added).
        env: environment overrides for every agent (see :func:`job_env`).
    """

    def __init__(self, hosts, logs: Path, flags: list[str], **env: str):
        self.hosts, self.logs, self.flags = hosts, Path(logs), list(flags)
        self.ckpt = hosts.shared / "ckpt"
        self.env = job_env(hosts[0], f"job{hosts.tag}", **env)
        self.agents: list[Agent] = []
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, host: Host, **env: str) -> Agent:
        """Start an agent of the job on ``host``."""
        n = sum(a.host is host for a in self.agents) + 1
        agent = Agent(host, f"{host.hostname}-{n}", self.logs, {**self.env, **env},
                      ["--checkpoint-dir", str(self.ckpt), *self.flags])
        self.agents.append(agent)
        return agent

    def texts(self) -> list[str]:
        """Every agent's log."""
        return [a.text() for a in self.agents]

    def wait_for(self, pattern: str, timeout: float, agents=None) -> re.Match:
        """:func:`wait_for` over the job's (or the given) agents."""
        return wait_for(agents or self.agents, pattern, timeout)

    def running(self) -> list[Agent]:
        return [a for a in self.agents if a.proc.poll() is None]


def lose_host(job: Job, host: Host, how: str = "kill", timeout: float = 180) -> int:
    """Lose ``host`` (``kill``: SIGKILL all its processes; ``cut``: take its link down) once a
    checkpoint committed; the other agents restart their groups without it. Returns the step of
    the checkpoint the survivors resumed from."""
    before = _seen(job)
    _wait_checkpoint(job, timeout)
    host.kill() if how == "kill" else host.cut()
    return _next_resume(job, before, timeout)[0]


def grow(job: Job, host: Host, old_world: int, timeout: float = 180) -> int:
    """Start an agent on ``host`` (back after :func:`lose_host`); waits until the job resumed
    at a world size above ``old_world``. Returns that world size."""
    host.kill()  # what is left of it (after a cut) is gone; the host is a fresh machine
    host.restore()
    before = _seen(job)
    job.start(host)
    world = 0
    while world <= old_world:
        step, world = _next_resume(job, before, timeout)
        before = _seen(job)
    return world


def preempt_all(job: Job, timeout: float = 120) -> dict[str, int]:
    """SIGTERM to every process of every host; waits until every agent exited. Returns each
    agent's exit status by name."""
    for host in job.hosts:
        host.signal()
    return {a.name: a.wait(timeout) for a in job.running()}


def die_mid_save(job: Job, host: Host, stall_dir: Path, timeout: float = 180) -> int:
    """``host`` dies while its ranks are in the middle of a save (the job must run
    shardckpt/testing/train_stalled.py with SHARDCKPT_STALL_HOST naming it). Waits until the
    survivors reported RankFailureError and resumed. Returns the step they resumed from."""
    before = _seen(job)
    deadline = time.monotonic() + timeout
    while not list(Path(stall_dir).glob("stalled-*")):
        if time.monotonic() > deadline or not job.running():
            raise ElasticError(f"no rank stalled in a save within {timeout:g} s:\n"
                               + "\n".join(tail(t) for t in job.texts()))
        time.sleep(0.1)
    time.sleep(0.5)  # the host's other ranks reach the stall too
    host.kill()
    Path(stall_dir, "released").touch()
    job.wait_for(r"RankFailureError", timeout)
    return _next_resume(job, before, timeout)[0]


def _wait_checkpoint(job: Job, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not list(job.ckpt.glob("step-*/manifest.json")):
        if time.monotonic() > deadline:
            raise ElasticError(f"no checkpoint committed within {timeout:g} s")
        time.sleep(0.2)


def _seen(job: Job) -> dict[str, int]:
    """How many resumes each agent's log shows."""
    return {a.name: len(resumes(a.text())) for a in job.agents}


def _next_resume(job: Job, seen: dict[str, int], timeout: float) -> tuple[int, int]:
    """The first resume printed after ``seen`` (from :func:`_seen`): (step, world)."""
    deadline = time.monotonic() + timeout
    while True:
        for a in job.agents:
            found = resumes(a.text())
            if len(found) > seen.get(a.name, 0):
                return found[seen.get(a.name, 0)]
        if time.monotonic() > deadline or not job.running():
            raise ElasticError(f"no resume within {timeout:g} s:\n"
                               + "\n".join(f"--- {a.name}\n{tail(a.text())}"
                                           for a in job.agents))
        time.sleep(0.2)
