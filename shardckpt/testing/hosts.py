"""Several hosts on one machine: Linux network namespaces on a private bridge.

Each :class:`Host` is a network namespace with one veth link onto a bridge made for this
:class:`Hosts` set, its own address in a private ``/24`` and its own hostname (every command
runs in a fresh UTS namespace that sets it, and a mount namespace whose ``/etc/hosts`` names
all the hosts, so torch's agents can resolve each other by name). The hosts share a checkpoint
root (standing in for NFS or Lustre) and each has a local directory of its own.

The addresses exist only inside the namespaces made here: the bridge has no address in the
machine's own namespace and the hosts have no default route, so nothing they send leaves the
bridge. Names carry a per-set random tag, so parallel sets never collide; :meth:`Hosts.close`
(also on failure, at interpreter exit, and for sets left by a dead process through
:func:`remove_stale`) kills every process in the namespaces and removes namespaces, links,
bridge and ``/etc/netns`` entries.

Needs root and ``ip``/``unshare`` (iproute2, util-linux); :func:`unavailable` says why not here.

Typical use::

    with Hosts(2, root=tmp_path) as hosts:
        a, b = hosts
        proc = b.popen(["python", "-c", "import socket; print(socket.gethostname())"])
        b.cut()       # link down: packets to and from b are lost
        b.restore()   # link up again
        b.kill()      # SIGKILL every process in b
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import CheckpointError

#: Namespaces, bridges and links made here start with this; the rest of the name is
#: ``<tag>`` (6 hex digits) and, for hosts, the host's index.
PREFIX = "sck"
_STATE_DIR = Path("/run/shardckpt-hosts")  # tag -> creating pid, for remove_stale
_NETNS_ETC = Path("/etc/netns")


class HostsError(CheckpointError, OSError):
    """The hosts could not be made (no root, no ``ip``, a command failed)."""


def unavailable(install: bool = False) -> str | None:
    """Why hosts cannot be made on this machine, or None when they can; with ``install``, a
    missing iproute2 is installed first (apt-get, through scripts/need_packages.sh)."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root (they create namespaces and a bridge)"
    script = Path(__file__).resolve().parents[2] / "scripts" / "need_packages.sh"
    if install and shutil.which("ip") is None and script.exists():
        subprocess.run(["bash", str(script), "ip:iproute2", "nsenter:util-linux"],
                       capture_output=True)
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"'{tool}' is missing (apt-get install iproute2 util-linux)"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise HostsError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


class Host:
    """One host of a :class:`Hosts` set (made by it, not directly)."""

    def __init__(self, hosts: "Hosts", index: int):
        self.index = index
        self.hostname = f"host{index}"
        self.netns = f"{hosts.tag}h{index}"
        self.link = f"{hosts.tag}v{index}"  # the bridge's end of the host's veth
        self.addr = f"{hosts.subnet}.{10 + index}"
        self.local_dir = hosts.root / "local" / self.hostname
        self._procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Host({self.hostname}, {self.addr}, netns={self.netns})"

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside this host (its netns, its hostname)."""
        # nsenter rather than ``ip netns exec``: the latter mounts a sysfs of the namespace's
        # own, which hides the cgroup file systems (slurmd needs them). The private mount
        # namespace only lays this host's hosts and resolv.conf over /etc's.
        etc = _NETNS_ETC / self.netns
        setup = (f"mount --bind {etc}/hosts /etc/hosts && "
                 f"mount --bind {etc}/resolv.conf /etc/resolv.conf && "
                 'hostname "$0" && exec "$@"')
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "--mount",
                "--", "sh", "-c", setup, self.hostname, *map(str, argv)]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in this host (``subprocess.Popen`` keyword arguments apply)."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, argv: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` in this host to completion (output captured as text by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), timeout=timeout, **kwargs)

    def pids(self) -> list[int]:
        """Every process now in this host's network namespace."""
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to every process in this host."""
        for pid in self.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL every process in this host (the host is lost) and reap them."""
        deadline = time.monotonic() + timeout
        while True:
            self.signal(signal.SIGKILL)
            if not self.pids() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for proc in self._procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass

    def cut(self) -> None:
        """Take the host's link down: its packets, both ways, are lost (processes live on)."""
        _ip("link", "set", self.link, "down")

    def restore(self) -> None:
        """Bring the host's link up again after :meth:`cut`."""
        _ip("link", "set", self.link, "up")


class Hosts:
    """``n`` hosts on one private bridge, with a shared checkpoint root; a context manager.

    Args:
        n: how many hosts.
        root: directory holding ``shared/`` (the checkpoint root every host sees) and
            ``local/<hostname>/`` (each host's own); default: a new temporary directory,
            removed on close.
    Raises:
        HostsError: hosts cannot be made here (see :func:`unavailable`); nothing is left.
    """

    def __init__(self, n: int, root: str | os.PathLike | None = None):
        self.tag = PREFIX + secrets.token_hex(3)
        self.subnet = f"10.231.{int(self.tag[-2:], 16)}"
        self.bridge = f"{self.tag}br"
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="shardckpt-hosts-") if root is None else root)
        self.shared = self.root / "shared"
        self.hosts = [Host(self, i) for i in range(n)]
        self._closed = False
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def _create(self) -> None:
        reason = unavailable()
        if reason:
            raise HostsError(reason)
        _STATE_DIR.mkdir(parents=True, exist_ok=True)
        (_STATE_DIR / self.tag).write_text(str(os.getpid()))
        self.shared.mkdir(parents=True, exist_ok=True)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        etc_hosts = "127.0.0.1 localhost\n" + "".join(
            f"{h.addr} {h.hostname}\n" for h in self.hosts)
        for h in self.hosts:
            self._create_host(h, etc_hosts)

    def _create_host(self, h: Host, etc_hosts: str) -> None:
        h.local_dir.mkdir(parents=True, exist_ok=True)
        etc = _NETNS_ETC / h.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(etc_hosts)  # each command sees it as /etc/hosts
        # No name servers: lookups of unknown names fail at once instead of timing out on
        # a server the host cannot reach.
        (etc / "resolv.conf").write_text("options timeout:1 attempts:1\n")
        _ip("netns", "add", h.netns)
        _ip("link", "add", h.link, "type", "veth", "peer", "name", f"{h.netns}e")
        _ip("link", "set", f"{h.netns}e", "netns", h.netns)
        _ip("link", "set", h.link, "master", self.bridge)
        _ip("link", "set", h.link, "up")
        ns = ("-n", h.netns)
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "link", "set", f"{h.netns}e", "name", "eth0")
        _ip(*ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
        _ip(*ns, "link", "set", "eth0", "up")

    def close(self) -> None:
        """Kill every process in the hosts and remove all they were made of (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for h in self.hosts:
            h.kill(timeout=5)
        _remove(self.tag, [h.netns for h in self.hosts])
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _remove(tag: str, namespaces: list[str]) -> None:
    for ns in namespaces:
        out = _ip("netns", "pids", ns, check=False).stdout
        for pid in out.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        _ip("netns", "del", ns, check=False)  # deletes the veth pair with it
        shutil.rmtree(_NETNS_ETC / ns, ignore_errors=True)
    links = _ip("-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(tag):
            _ip("link", "del", name, check=False)
    (_STATE_DIR / tag).unlink(missing_ok=True)
    for folder in (_NETNS_ETC, _STATE_DIR):
        try:
            folder.rmdir()  # only when empty: another set may still be using it
        except OSError:
            pass


def remove_stale() -> list[str]:
    """Remove host sets whose creating process is gone (a test run killed hard); their tags."""
    removed = []
    for entry in _STATE_DIR.glob(f"{PREFIX}*") if _STATE_DIR.is_dir() else []:
        try:
            os.kill(int(entry.read_text()), 0)
            continue  # still alive: someone else's running set
        except (ProcessLookupError, ValueError):
            pass
        tag = entry.name
        spaces = _ip("netns", "list", check=False).stdout.split()
        _remove(tag, [ns for ns in spaces if ns.startswith(tag)])
        removed.append(tag)
    return removed
