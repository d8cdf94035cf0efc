"""``async_save``: stall the training only for the copy; encode, write and commit behind it.

The caller's thread flattens the state, runs the plan round (collective, through the store),
and stages this rank's pieces (stage.py); a background thread then writes the staged batches
and runs the commit round. One save is in flight at a time: a new one waits for the previous
(or raises SaveInProgressError with ``on_busy="raise"``). A background failure is never lost:
``result()`` raises it, and so does the next ``async_save`` if nobody called ``result()``.
"""

from __future__ import annotations

import threading
import time

from . import stage
from .api import SaveInfo, _check_metadata
from .errors import CheckpointError
from .observe import log_save
from .saver import plan_save
from .storage import open_checkpoint
from .write import WriteOptions


class SaveInProgressError(CheckpointError, RuntimeError):
    """``async_save(..., on_busy="raise")`` while the previous save is still running."""


class SaveHandle:
    """The future of one ``async_save``."""

    def __init__(self, path: str, started: float):
        self.path, self._started = path, started
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._info: SaveInfo | None = None
        self._observed = False
        self._staged = threading.Event()  # set once stall_seconds is known
        self.stall_seconds = 0.0  # how long async_save blocked the caller

    def done(self) -> bool:
        """Whether the background work has finished (committed or failed)."""
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> SaveInfo:
        """Wait for the global commit; returns SaveInfo or raises what the background raised.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"{self.path}: save still running after {timeout} s")
        self._observed = True
        if self._error is not None:
            raise self._error
        return self._info

    def _run(self, planned, stager) -> None:
        try:
            report = planned.finish(stager.batches())
            self._info = info = SaveInfo.from_report(self.path, report,
                                                     time.perf_counter() - self._started)
            self._staged.wait()
            log_save(info.path, info.raw_bytes, info.stored_bytes, info.seconds,
                     stall=self.stall_seconds)
        except BaseException as exc:  # kept for result() and the next async_save
            self._error = exc
        finally:
            stager.abort()  # wakes a caller still staging, if the writer stopped early
            stager.release()
            self._finished.set()


_inflight: SaveHandle | None = None
_inflight_lock = threading.Lock()


def _previous(on_busy: str) -> None:
    prev = _inflight
    if prev is None:
        return
    if not prev.done():
        if on_busy == "raise":
            raise SaveInProgressError(f"a save to {prev.path} is still running")
        prev._finished.wait()
    if prev._error is not None and not prev._observed:
        prev._observed = True
        raise prev._error


def async_save(state, path, *, staging_budget_bytes: int | None = None, on_busy: str = "wait",
               codec: str | None = None, level: int | None = None, metadata: dict | None = None,
               overwrite: bool = False, timeout: float | None = None,
               storage_options: dict | None = None, **tuning) -> SaveHandle:
    """Start saving ``state`` to ``path``; returns once the state is copied out.

    After it returns the caller may change the tensors (``optimizer.step()``); the checkpoint
    holds the values at the call. Collective like ``save`` when several ranks exist.

    Args:
        staging_budget_bytes: host memory for staged copies (default: 0.6 x available memory /
            local ranks). A state that fits is copied whole (the stall is the copy); a larger one
            streams through two halves of the budget (the stall then includes writing all but
            the last batch, but memory stays within the budget). The native encode pool
            (``pool_bytes``) comes on top.
        on_busy: ``"wait"`` for the previous save to commit, or ``"raise"``
            SaveInProgressError while it runs.
        others: as for ``save``.

    Raises:
        the previous save's error if it failed and nobody called its ``result()``;
        the plan round's errors (as ``save``). Write and commit errors surface in ``result()``.
    """
    global _inflight
    t0 = time.perf_counter()
    if on_busy not in ("wait", "raise"):
        raise ValueError(f"on_busy must be 'wait' or 'raise', not {on_busy!r}")
    with _inflight_lock:
        _previous(on_busy)
        opts = WriteOptions.resolve(codec=codec, level=level, **tuning)
        storage, name = open_checkpoint(path, storage_options)
        planned = plan_save(state, storage, name, opts, _check_metadata(metadata), overwrite,
                            timeout)
        budget = stage.default_budget() if staging_budget_bytes is None else staging_budget_bytes
        stager = stage.Stager(planned.pieces(), budget, opts.chunk_bytes)
        handle = SaveHandle(storage.url(name), t0)
        writer = threading.Thread(target=handle._run, args=(planned, stager),
                                  name="shardckpt-async-save")
        writer.start()
        try:
            stager.run()
        finally:
            handle.stall_seconds = time.perf_counter() - t0
            handle._staged.set()
        _inflight = handle
    return handle
