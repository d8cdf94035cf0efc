"""Retries of object-store requests: which errors are transient, and a bounded backoff.

Object stores fail requests now and then (throttling, 5xx, dropped connections, timeouts); those
are retried with exponential backoff and jitter, up to the ``storage_retries`` knob. Anything
else, or a transient error that outlives its retries, becomes a ``StorageError`` naming the
object, which the save and load pipelines report on every rank. ``FileNotFoundError`` and
``FileExistsError`` pass through untouched: callers act on them (so does NotImplementedError,
a capability the store lacks).
"""

from __future__ import annotations

import errno
import random
import re
import time
from typing import Callable, TypeVar

from .. import knobs
from ..errors import CheckpointError, StorageError
from .base import Storage
from .wrapper import StorageWrapper

T = TypeVar("T")

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.EREMOTEIO,
                     errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH}
# Raised by botocore / aiohttp / urllib3 below fsspec; matched by name so none must be imported.
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                    "ConnectTimeoutError", "ServerDisconnectedError", "ClientOSError",
                    "ClientPayloadError", "IncompleteRead", "ResponseStreamingError"}
_TRANSIENT_WORDS = re.compile(r"SlowDown|Throttl|ServiceUnavailable|InternalError|RequestTimeout"
                              r"|TooManyRequests|\b(?:429|500|502|503|504)\b")


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request may succeed when repeated."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, CheckpointError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(t.__name__ in _TRANSIENT_NAMES for t in type(exc).__mro__):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return isinstance(exc, OSError) and _TRANSIENT_WORDS.search(str(exc)) is not None


def call(fn: Callable[[], T], what: str, retries: int | None = None,
         backoff: float | None = None) -> T:
    """``fn()``, repeated after transient errors; ``what`` names the request in the error.

    Raises:
        StorageError: a permanent error, or a transient one after ``retries`` retries.
        FileNotFoundError, FileExistsError: as ``fn`` raised them.
    """
    retries = knobs.get("storage_retries") if retries is None else retries
    delay = knobs.get("storage_backoff") if backoff is None else backoff
    for attempt in range(retries + 1):
        try:
            return fn()
        except (FileNotFoundError, FileExistsError, CheckpointError, NotImplementedError):
            raise
        except Exception as exc:
            if not is_transient(exc) or attempt == retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
                raise StorageError(err, f"{what} failed{tries}: {type(exc).__name__}: {exc}"
                                   ) from exc
        time.sleep(min(delay * 2 ** attempt, 10.0) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


class RetryingStorage(StorageWrapper):
    """Every request of the wrapped storage goes through :func:`call`."""

    def _call(self, op: str, path: str, *args, **kwargs):
        fn = getattr(self.inner, op)
        return call(lambda: fn(path, *args, **kwargs), f"{op} {self.inner.url(path)}")


def with_retries(storage: Storage) -> Storage:
    """``storage`` with retries, unless it is local (local errors are not transient)."""
    return storage if storage.local_path("") is not None else RetryingStorage(storage)
