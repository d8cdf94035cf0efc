"""A real SLURM cluster on one machine: slurmctld and one slurmd per network-namespace host.

Debian's slurmd is built without ``--enable-multiple-slurmd``, so one machine cannot run two
slurmd side by side; each :class:`~shardckpt.testing.hosts.Host` has its own hostname and
address, though, so each runs a slurmd of its own and the cluster has as many nodes as hosts.
slurmctld runs on the first host; a private munged (its own socket under the cluster's folder,
Debian's ``/etc/munge/munge.key``) authenticates them. Client commands (``sbatch``,
``squeue``, ``scancel``, ``scontrol``) run through :meth:`SlurmCluster.run` on the first host.

Everything lives under the cluster's folder (configuration, state, spool, logs) and every
daemon is stopped by :meth:`SlurmCluster.close`. :func:`unavailable` says why there can be no
cluster here (the packages slurm-wlm and munge are installed by scripts/need_packages.sh when
missing and possible).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .hosts import Hosts, HostsError, unavailable as hosts_unavailable

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["slurmctld:slurm-wlm", "slurmd:slurm-wlm", "sbatch:slurm-client", "munged:munge"]


def unavailable(install: bool = True) -> str | None:
    """Why a cluster cannot run here, or None; with ``install``, missing packages are
    installed first (apt-get, through scripts/need_packages.sh)."""
    reason = hosts_unavailable(install)
    if reason:
        return reason
    if install:
        got = subprocess.run(["bash", str(REPO / "scripts" / "need_packages.sh"), *PACKAGES],
                             capture_output=True, text=True)
        if got.returncode != 0:
            return got.stderr.strip() or "slurm-wlm and munge could not be installed"
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is missing (apt-get install slurm-wlm munge)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key is missing (the munge package makes it)"
    return None


def _conf(hosts: Hosts, d: Path) -> str:
    head = hosts[0]
    nodes = "".join(f"NodeName={h.hostname} NodeAddr={h.addr} CPUs={os.cpu_count()} "
                    "RealMemory=1000 State=UNKNOWN\n" for h in hosts)
    return f"""ClusterName=shardckpt
SlurmctldHost={head.hostname}({head.addr})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.socket
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


class SlurmCluster:
    """slurmctld, one slurmd per host and a munged, under ``folder``; a context manager.

    Args:
        hosts: the hosts that become the nodes (the first also runs slurmctld).
        folder: where configuration, state, spool and logs go.
    Raises:
        HostsError: a daemon did not start or the nodes did not come up (its log says why).
    """

    def __init__(self, hosts: Hosts, folder: str | os.PathLike, timeout: float = 60):
        self.hosts, self.dir = hosts, Path(folder)
        self.conf = self.dir / "slurm.conf"
        self._daemons: list[subprocess.Popen] = []
        try:
            self._start(timeout)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def env(self) -> dict:
        """The environment for SLURM commands against this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start(self, timeout: float) -> None:
        for parent in reversed(self.dir.parents[:2]):
            if parent.is_dir():
                os.chmod(parent, os.stat(parent).st_mode | 0o111)  # munged wants its socket reachable
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for h in self.hosts:
            (self.dir / "spool" / h.hostname).mkdir(exist_ok=True)
        self.conf.write_text(_conf(self.hosts, self.dir))
        self._daemon(None, ["munged", "--foreground", "--force",
                            f"--socket={self.dir}/munge.socket",
                            f"--pid-file={self.dir}/munged.pid",
                            f"--seed-file={self.dir}/munged.seed",
                            f"--log-file={self.dir}/munged.log"], "munged")
        self._wait(lambda: (self.dir / "munge.socket").exists(), timeout, "munged")
        self._daemon(self.hosts[0], ["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for h in self.hosts:
            self._daemon(h, ["slurmd", "-D", "-f", str(self.conf)], f"slurmd-{h.hostname}")
        self._wait(self._nodes_idle, timeout, "the nodes")

    def _daemon(self, host, argv: list[str], name: str) -> None:
        out = open(self.dir / f"{name}.out", "w")
        env = self.env
        proc = (host.popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env) if host else
                subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True))
        self._daemons.append(proc)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p for p in self._daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                                 for p in sorted(self.dir.glob("*.out")) + sorted(
                                     self.dir.glob("*.log")))
                raise HostsError(f"SLURM: {what} did not come up within {timeout:g} s:\n{logs}")
            time.sleep(0.5)

    def _nodes_idle(self) -> bool:
        got = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=20)
        states = [line.split()[1] for line in got.stdout.splitlines() if line.strip()]
        return len(states) == len(self.hosts) and all(s.startswith("idle") for s in states)

    def run(self, argv: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a SLURM client command (or anything) on the controller's host."""
        kwargs.setdefault("cwd", REPO)
        kwargs.setdefault("env", self.env)
        return self.hosts[0].run(argv, timeout=timeout, **kwargs)

    def job_state(self, job_id: str) -> tuple[str, int]:
        """(state, restart count) of a job, from scontrol."""
        out = self.run(["scontrol", "show", "job", job_id], timeout=20).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", "0") or 0)

    def close(self) -> None:
        """Stop every daemon (idempotent)."""
        for proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.terminate()
        for proc in self._daemons:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._daemons = []
        for h in self.hosts:
            h.kill()  # the jobs' processes too


def main(argv: list[str]) -> int:
    """``python -m shardckpt.testing.slurm NODES FOLDER [COMMAND...]``: bring a cluster up,
    run COMMAND on the controller's host (or wait for Ctrl-C), stop everything."""
    import signal as _signal
    nodes, folder, command = int(argv[0]), Path(argv[1]).resolve(), argv[2:]
    reason = unavailable()
    if reason:
        print(f"slurm_local: {reason}", file=sys.stderr)
        return 2
    with Hosts(nodes, root=folder / "hosts") as hosts, \
            SlurmCluster(hosts, folder / "slurm") as cluster:
        print(f"slurm_local: {nodes} node(s) {[h.hostname for h in hosts]} up; "
              f"SLURM_CONF={cluster.conf}; shared folder {hosts.shared}", flush=True)
        if command:
            return subprocess.call(hosts[0].command(command), env=cluster.env, cwd=REPO)
        print("slurm_local: Ctrl-C stops the cluster", flush=True)
        _signal.sigwait({_signal.SIGINT, _signal.SIGTERM})
    return 0


if __name__ == "__main__":
    import signal as _signal
    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT, _signal.SIGTERM})
    sys.exit(main(sys.argv[1:]))
