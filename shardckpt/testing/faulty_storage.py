"""A storage wrapper that injects failures and latency, for retry and failure tests.

``FaultyStorage(inner, FaultPlan(...))`` fails the Nth matching request (and the ``times - 1``
after it) with a transient error (a connection reset, which the retry layer repeats) or a
permanent one (permission denied, which it reports), and may delay every request. One plan can
be shared by many wrappers, so "the 3rd upload of the save" counts across every storage the save
opens: ``inject(plan)`` wraps every storage ``open_checkpoint`` opens until the block ends.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from dataclasses import dataclass, field

from ..storage import WRAPPERS, Storage
from ..storage.wrapper import StorageWrapper


@dataclass
class FaultPlan:
    """Which requests fail, how, and how slow every request is.

    Attributes:
        fail_at: the 1-based index, among matching requests, of the first failure (None: none).
        times: how many consecutive matching requests fail from there.
        kind: ``"transient"`` (ConnectionResetError) or ``"permanent"`` (PermissionError).
        ops: request names that count (``write``, ``read``, ``upload_part``...); None: all.
        match: a substring the request's path must contain; None: any.
        latency: seconds added to every request.
        log: ``(op, path, failed)`` of every request seen, in order.
    """

    fail_at: int | None = None
    times: int = 1
    kind: str = "transient"
    ops: tuple | None = None
    match: str | None = None
    latency: float = 0.0
    log: list = field(default_factory=list)
    _seen: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hit(self, op: str, path: str) -> None:
        """Count one request; sleep the latency; raise if it is chosen to fail."""
        if self.latency:
            time.sleep(self.latency)
        counts = (self.ops is None or op in self.ops) and (self.match is None
                                                           or self.match in path)
        with self._lock:
            if counts:
                self._seen += 1
            n = self._seen
            fail = counts and self.fail_at is not None and \
                self.fail_at <= n < self.fail_at + self.times
            self.log.append((op, path, fail))
        if fail:
            raise self.error(op, path)

    def error(self, op: str, path: str) -> OSError:
        """The exception an injected failure raises."""
        what = f"injected {self.kind} fault in {op} {path}"
        if self.kind == "transient":
            return ConnectionResetError(errno.ECONNRESET, what)
        return PermissionError(errno.EACCES, what)

    @property
    def failures(self) -> int:
        """How many requests were failed so far."""
        return sum(1 for *_, failed in self.log if failed)


class FaultyStorage(StorageWrapper):
    """``inner`` with the faults and latency of ``plan``."""

    def __init__(self, inner: Storage, plan: FaultPlan):
        super().__init__(inner)
        self.plan = plan

    def _call(self, op: str, path: str, *args, **kwargs):
        self.plan.hit(op, path)
        return super()._call(op, path, *args, **kwargs)


@contextlib.contextmanager
def inject(plan: FaultPlan):
    """Within the block, every storage opened (by save, load, ...) is a FaultyStorage of
    ``plan``, beneath the retries of object stores. In this process only."""
    wrap = lambda storage: FaultyStorage(storage, plan)  # noqa: E731
    WRAPPERS.append(wrap)
    try:
        yield plan
    finally:
        WRAPPERS.remove(wrap)
