"""One manager per root: the lease file ``.lease.json`` that a manager's rank 0 holds.

Two jobs pointed at one root by mistake overwrite each other's steps, and each one's retention
deletes the other's checkpoints. The lock has to work where checkpoints live: local and shared
POSIX file systems, and object stores, which have no locks, no rename and no fsync. So it is a
lease: a small JSON record (owner id, host, boot id, pid and its start time, when renewed, when
it expires) that its holder rewrites every ``lease_seconds / 3`` from a background thread.

Taking it: the file is created if absent (O_EXCL on disks, the store's create-if-absent put).
An existing lease is taken over only when it has expired (its holder stopped renewing: killed,
hung, its host gone) or when its holder ran on this machine and that process is provably gone
(no process with its pid and start time): a job restarted on the same host after ``kill -9``
takes the root at once, one restarted elsewhere waits for the expiry. A holder that renews while
the second manager waits is alive: the second fails with RootLeaseError naming it.

Races: a taker reads its record back after a short settle; of two takers the later write wins
and the earlier one refuses. The holder reads the lease again before each save and before
``latest`` and retention; one that lost it (it stalled past the expiry and another job took
over) stops with RootLeaseError instead of deleting the new holder's checkpoints. Clocks of the
hosts sharing a root must agree to well within ``lease_seconds``.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import threading
import time

from .. import observe
from ..errors import CheckpointError, RootLeaseError
from ..storage import Storage, storage_error
from .layout import replace_file

LEASE_NAME = ".lease.json"
SETTLE_SECONDS = 0.25  # longer than a read-to-write gap of a racing taker


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22): with
    the pid, it names one process even after the pid is reused."""
    text = _read_text(f"/proc/{pid}/stat")
    try:
        return text.rsplit(")", 1)[1].split()[19] if text else None
    except IndexError:
        return None


def _machine() -> dict:
    """What makes two records come from one machine and one pid namespace."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {"host": socket.gethostname(),
            "boot": _read_text("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def holder_alive(record: dict) -> bool | None:
    """Whether the lease holder's process lives: True or False when it ran on this machine (same
    host, boot and pid namespace), None when that cannot be told from here."""
    here = _machine()
    if any(record.get(k) != v for k, v in here.items()) or None in here.values():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process, alive
    started = _started(pid)
    return not (record.get("started") and started and started != record["started"])


def describe(record: dict | None, path: str) -> str:
    """The holder of a lease, for an error message."""
    if not record:
        return f"{path} holds an unreadable lease"
    left = record.get("expires", 0) - time.time() if isinstance(record.get("expires"),
                                                                  (int, float)) else None
    when = f"expires in {left:.0f} s" if left is not None else "no expiry"
    return (f"manager {record.get('owner')!r} (host {record.get('host')!r}, pid "
            f"{record.get('pid')}, {when}) holds {path}")


class RootLease:
    """The lease of one root, held by this process (the manager's rank 0).

    Args:
        storage: the manager's root.
        seconds: how long a record stays valid without renewal (knob ``lease_seconds``).
    """

    def __init__(self, storage: Storage, seconds: float):
        if not seconds > 0:
            raise ValueError(f"lease seconds must be > 0, not {seconds!r}")
        self.storage, self.seconds = storage, float(seconds)
        self.owner = secrets.token_hex(8)
        self.path = storage.url(LEASE_NAME)
        self.lost: str | None = None  # why, once this process no longer holds the root
        self.read_only = False  # creating the lease failed for want of write access
        self._valid_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ records
    def _record(self) -> dict:
        now = time.time()
        return {"format": 1, "owner": self.owner, **_machine(), "pid": os.getpid(),
                "started": _started(os.getpid()), "renewed": now, "expires": now + self.seconds}

    def read(self) -> dict | None:
        """The stored record; None when there is no lease; {} when it cannot be parsed."""
        try:
            data = self.storage.read(LEASE_NAME)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a folder in its place, another user's file: typed, named
            raise exc if isinstance(exc, CheckpointError) else \
                storage_error(exc, f"reading {self.path}") from exc
        try:
            record = json.loads(data)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _write(self, exclusive: bool) -> bool:
        """Write this process's record; False when ``exclusive`` and a lease exists."""
        record = self._record()
        data = json.dumps(record).encode() + b"\n"
        if exclusive:
            try:
                self.storage.write(LEASE_NAME, data, durable=True, exclusive=True)
            except FileExistsError:
                return False
            except OSError as exc:
                self._drop_partial()
                self.read_only = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                raise exc if isinstance(exc, CheckpointError) else \
                    storage_error(exc, f"writing {self.path}") from exc
        else:
            replace_file(self.storage, LEASE_NAME, data, "lease")
        self._valid_until = record["expires"]
        return True

    def _drop_partial(self) -> None:
        """After a failed create (disk full): remove the empty or torn file it may have left,
        which would otherwise hold the root until it ages past ``seconds``. A valid record is
        another manager's and stays."""
        try:
            if self.read() == {}:
                self.storage.delete(LEASE_NAME)
        except (OSError, CheckpointError):
            pass

    def _stale(self, record: dict) -> bool:
        """Whether ``record`` may be taken over: expired, or its holder provably gone."""
        if not record:  # half-written by a create that crashed, or garbage: judge by age
            changed = self.storage.modified(LEASE_NAME)
            return changed is None or time.time() - changed > self.seconds
        expires = record.get("expires")
        if not isinstance(expires, (int, float)) or expires < time.time():
            return True
        return holder_alive(record) is False

    # ------------------------------------------------------------------ taking, keeping
    def acquire(self, wait: float | None = None) -> None:
        """Take the lease, waiting up to ``wait`` seconds (default: one lease period) for a
        holder that stopped renewing to expire, and start renewing it.

        Raises:
            RootLeaseError: a live manager holds the root (named in the message).
            StorageError: the lease could not be read or written.
        """
        deadline = time.time() + (self.seconds * 1.2 if wait is None else wait)
        first = None
        while True:
            if self._write(exclusive=True):
                self._confirm(settle=not self.storage.atomic_rename)
                break
            record = self.read()
            if record is None:
                continue  # released between our create and our read: create again
            if self._stale(record):
                observe.logger.warning("shardckpt: taking over the stale lease: %s",
                                       describe(record, self.path))
                self._write(exclusive=False)
                self._confirm(settle=True)
                break
            first = record if first is None else first
            renewed = record.get("renewed") != first.get("renewed")
            if holder_alive(record) or renewed or time.time() >= deadline:
                raise RootLeaseError(f"another CheckpointManager uses this root: "
                                     f"{describe(record, self.path)}. Point this job at another "
                                     "root, or stop the other one (a crashed holder's lease "
                                     "expires by itself).", holder=record)
            time.sleep(max(0.05, min(self.seconds / 6, deadline - time.time())))
        self._thread = threading.Thread(target=self._renew_loop, name="shardckpt-lease",
                                        daemon=True)
        self._thread.start()

    def _confirm(self, settle: bool) -> None:
        """Read the record back (after a settle where racing writers are possible)."""
        if settle:
            time.sleep(SETTLE_SECONDS)
        record = self.read()
        if not record or record.get("owner") != self.owner:
            raise RootLeaseError(f"another CheckpointManager took this root at the same time: "
                                 f"{describe(record, self.path)}", holder=record or None)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.check()
                self._write(exclusive=False)
            except RootLeaseError:
                return
            except (OSError, CheckpointError) as exc:  # a storage hiccup: try again soon
                observe.logger.warning("shardckpt: renewing %s failed: %s", self.path, exc)

    def check(self) -> None:
        """Raise RootLeaseError unless this process still holds the lease (one read)."""
        if self.lost is None and time.time() > self._valid_until:
            self.lost = f"{self.path} was not renewed in time and expired"
        if self.lost is None:
            try:
                record = self.read()
            except (OSError, CheckpointError) as exc:
                record = {"owner": self.owner} if time.time() < self._valid_until else None
                observe.logger.warning("shardckpt: reading %s failed: %s", self.path, exc)
            if not record or record.get("owner") != self.owner:
                self.lost = f"lost the root's lease: {describe(record, self.path)}"
        if self.lost is not None:
            raise RootLeaseError(f"this CheckpointManager no longer holds its root "
                                 f"({self.lost}); nothing more is saved or deleted",
                                 holder=None)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this process's."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            record = self.read()
            if record and record.get("owner") == self.owner and self.lost is None:
                self.storage.delete(LEASE_NAME)
        except (OSError, CheckpointError) as exc:  # it expires by itself
            observe.logger.warning("shardckpt: releasing %s failed: %s", self.path, exc)
        self.lost = self.lost or "released"


def take_for_job(storage: Storage, ranks, seconds: float) -> RootLease | None:
    """Rank 0 takes the lease (its ``RootLease`` is returned there, None elsewhere); when that
    fails every rank raises, so no rank of the job starts saving. ``ranks``: the manager's
    ``RankAgreement`` (dist/groups.py). A root this process may not write (a read-only mount) gets no lease, with a
    warning: such a manager can restore, and its saves fail on the first write."""
    lease, failure, text = None, None, ""
    if ranks.rank == 0:
        try:
            lease = RootLease(storage, seconds)
            lease.acquire()
        except Exception as exc:  # every rank must learn of it, not wait for rank 0
            if lease is not None and lease.read_only:
                observe.logger.warning("shardckpt: no lease on %s, the root is read-only "
                                       "here (%s): this manager can restore, not save",
                                       storage.url(""), exc)
            else:
                failure, text = exc, f"{type(exc).__name__}: {exc}"
            lease = None
    text = bytes(ranks.rank0_list(list(text.encode()))).decode()
    if failure is not None:
        raise failure
    if text:
        raise RootLeaseError(f"(rank 0) {text}")
    return lease
