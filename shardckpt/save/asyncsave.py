"""``async_save``: stall the training only for the copy; encode, write and commit behind it.

The caller's thread flattens the state, runs the plan round (collective, through the store),
and stages this rank's pieces (stage.py); a background thread then writes the staged batches
and runs the commit round. With guards (guard.py), the tensors an optimizer owns are copied by
another background thread after the call returns, while the next forward/backward runs, and
that optimizer's ``step()`` waits for them. One save is in flight at a time: a new one waits for the previous
(or raises SaveInProgressError with ``on_busy="raise"``). A background failure is never lost:
``result()`` raises it, and so does the next ``async_save`` if nobody called ``result()``.
"""

from __future__ import annotations

import threading
import time

from dataclasses import replace

from .. import knobs
from . import stage
from ..types import SaveInfo
from ..errors import CheckpointError
from ..observe import log_save, logger
from .guard import Watch, arm, find_guards, owners, storage_key
from .incremental import base_name
from .pipeline import check_metadata, plan_save
from ..format.tree import dtensor_type
from ..storage import open_checkpoint
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
        self._staged = threading.Event()
        self._staged.set()
        self._watch: Watch | None = None
        self.stall_seconds = 0.0  # how long async_save blocked the caller
        self._stall_known = threading.Event()  # set once stall_seconds is final (for the log)
        self._callbacks: list = []
        self._callbacks_lock = threading.Lock()

    @property
    def wait_seconds(self) -> float:
        """How long guards' step pre-hooks and ``wait_staged`` blocked, in total."""
        return self._watch.wait_seconds if self._watch is not None else 0.0

    def staged(self) -> bool:
        """Whether every tensor is copied out, so that guarded tensors may change."""
        return self._staged.is_set()

    def wait_staged(self, timeout: float | None = None) -> None:
        """Block until every tensor is copied out (``optimizer.step()`` of a guard does this
        itself); call it before changing a guarded tensor any other way. Counts in
        ``wait_seconds``. Copy failures are raised by ``result()``, not here.

        Raises:
            TimeoutError: still copying after ``timeout`` seconds.
        """
        ok = self._watch.wait(None, timeout) if self._watch is not None else True
        if not ok or not self._staged.wait(timeout):
            raise TimeoutError(f"{self.path}: still copying after {timeout} s")

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

    def add_done_callback(self, fn) -> None:
        """Call ``fn(info, error)`` once the save has committed (``info``: its SaveInfo) or
        failed (``error``), on the writer thread before ``done()`` turns true, so that it
        precedes whatever the caller does after ``result()``; at once on this thread if the
        save has finished already. What ``fn`` raises is logged, never raised.
        """
        with self._callbacks_lock:
            if not self._finished.is_set():
                self._callbacks.append(fn)
                return
        self._call(fn)

    def _call(self, fn) -> None:
        try:
            fn(self._info, self._error)
        except Exception:
            logger.exception("shardckpt: done callback of the save of %s failed", self.path)

    def _run(self, planned, stager) -> None:
        try:
            report = planned.finish(stager.batches())
            self._info = info = SaveInfo.from_report(self.path, report,
                                                     time.perf_counter() - self._started)
            self._stall_known.wait()
            log_save(info.path, info.raw_bytes, info.stored_bytes, info.seconds,
                     stall=self.stall_seconds)
        except BaseException as exc:  # kept for result() and the next async_save
            self._error = exc
        finally:
            stager.abort()  # wakes a copy still staging, if the writer stopped early
            stager.release()
            self._finish()

    def _finish(self) -> None:
        """Run the done callbacks (those added meanwhile too), then mark the save done."""
        while True:
            with self._callbacks_lock:
                callbacks, self._callbacks = self._callbacks, []
                if not callbacks:
                    self._finished.set()
                    return
            for fn in callbacks:
                self._call(fn)


_WRITER = stage.Worker("shardckpt-async-save", "sc-save", background=True)
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
    if prev._watch is not None:
        prev._watch.remove_hooks()  # retired no-ops by now (see guard.py)
    if prev._error is not None and not prev._observed:
        prev._observed = True
        raise prev._error


def split_budget(budget: int, opts: WriteOptions) -> tuple[int, WriteOptions]:
    """``(arena bytes, options)`` sharing ``budget`` between the staging arena and the native
    encode pool: the pool gets ``staging_pool_fraction`` of it (at most ``pool_bytes``; zstd
    needs room for two chunks per file), the arena the rest."""
    pool = min(opts.pool_bytes, int(budget * float(knobs.get("staging_pool_fraction"))))
    if opts.codec == "zstd":
        pool = max(pool, opts.files_per_rank * 2 * (opts.chunk_bytes + (1 << 16)))
    pool = max(pool, 1 << 16)
    return max(budget - pool, stage.MIN_BUDGET), replace(opts, pool_bytes=pool)


def _order(planned, guards) -> tuple[list, Watch | None]:
    """This rank's pieces, eager ones first; and the Watch of the lazy ones (None if none)."""
    pieces = planned.pieces()
    if not guards:
        return pieces, None
    owned, dt = owners(guards), dtensor_type()
    eager, lazy = [], []
    for p in pieces:
        g = owned.get(storage_key(p.tensor, dt))
        pages = arm(p.tensor) if g else False  # watched from here on (guard.py)
        (lazy if pages is not False else eager).append((min(g[0]) if g else 0, p, g, pages))
    if not lazy:
        return pieces, None
    lazy.sort(key=lambda x: x[0])  # the first guard's tensors first: its step waits least
    watch = Watch(guards, [planned.items[int(p.key)].key for _, p, _, _ in lazy],
                  [p.tensor for _, p, _, _ in lazy], [g for _, _, g, _ in lazy],
                  [w for _, _, _, w in lazy])
    return [x[1] for x in eager] + [x[1] for x in lazy], watch


def async_save(state, path, *, guard=None, staging_budget_bytes: int | None = None,
               on_busy: str = "wait",
               codec: str | None = None, level: int | None = None, metadata: dict | None = None,
               overwrite: bool = False, timeout: float | None = None,
               storage_options: dict | None = None, base=None, in_place: bool = False,
               **tuning) -> SaveHandle:
    """Start saving ``state`` to ``path``; returns once the unguarded tensors are copied out.

    The checkpoint holds the values at the call. After it returns the caller may change every
    tensor no guard owns; a guard's tensors are copied in the background and its
    ``optimizer.step()`` first waits for them (a step pre-hook). Collective like ``save`` when
    several ranks exist.

    Args:
        guard: an optimizer or a list of them whose parameters and per-parameter state
            (matched by storage, DTensor shards included) only change in ``step()``. An
            optimizer found as a value inside ``state`` is a guard too. Changing a guarded
            tensor elsewhere before ``handle.wait_staged()`` fails the save with
            StateChangedError (never a torn checkpoint).
        staging_budget_bytes: host memory the save adds (default: 0.6 x available memory /
            local ranks): the native encode pool takes ``staging_pool_fraction`` of it (at most
            ``pool_bytes``), the staging arena the rest. A state that fits the arena is copied
            whole (the stall is the copy of the unguarded tensors); a larger one streams through
            two halves of it (the caller then waits for writing all but the last eager batch;
            guarded tensors stream in the background and ``step()`` waits for what remains).
        on_busy: ``"wait"`` for the previous save to commit, or ``"raise"``
            SaveInProgressError while it runs.
        in_place: on a local disk, write a fresh checkpoint under its final name (its manifest
            last) instead of a hidden temporary folder, so that the name exists, and no other
            entry shows, from the moment this returns; a crash leaves a folder without manifest
            (never loaded as a checkpoint). Replacing a checkpoint is atomic either way.
        others: as for ``save``.

    Raises:
        the previous save's error if it failed and nobody called its ``result()``;
        the plan round's errors (as ``save``). Write and commit errors, and StateChangedError,
        surface in ``result()`` (RankFailureError naming the rank with several ranks).
    """
    global _inflight
    t0 = time.perf_counter()
    if on_busy not in ("wait", "raise"):
        raise ValueError(f"on_busy must be 'wait' or 'raise', not {on_busy!r}")
    with _inflight_lock:
        _previous(on_busy)
        guards = find_guards(state, guard)
        opts = WriteOptions.resolve(codec=codec, level=level, **tuning)
        storage, name = open_checkpoint(path, storage_options)
        planned = plan_save(state, storage, name, opts, check_metadata(metadata), overwrite,
                            timeout, base_name(storage, name, base, storage_options),
                            in_place=in_place)
        budget = stage.default_budget() if staging_budget_bytes is None else staging_budget_bytes
        arena_bytes, planned.opts = split_budget(budget, planned.opts)
        pieces, watch = _order(planned, guards)
        stager = stage.Stager(pieces, arena_bytes, opts.chunk_bytes,
                              len(pieces) - len(watch.tensors) if watch else None, watch)
        handle = SaveHandle(storage.url(name), t0)
        handle._staged, handle._watch = stager.staged, watch
        _WRITER.submit(handle._run, planned, stager)
        try:
            if watch is not None:
                watch.install()
            stager.run()
        finally:
            handle.stall_seconds = time.perf_counter() - t0
            handle._stall_known.set()
        _inflight = handle
    return handle
