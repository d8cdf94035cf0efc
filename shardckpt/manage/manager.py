"""``CheckpointManager``: periodic saves, retention, preemption and resume for a training loop.

The manager sits on top of the public calls (``save`` / ``async_save`` / ``load``) and never
reaches into a pipeline stage. Each checkpoint is a folder ``<root>/step-<8+ digits>``; the
manifest's metadata records the step, the metrics and why it was saved.

Distributed use: every rank constructs the manager (collectively) and makes the same calls.
Decisions that depend on a rank's own view (a preemption signal reached this rank, this rank's
clock says a timed save is due, which checkpoints exist) are agreed through a small gloo group
created for the manager, so ranks never diverge and the training's own (NCCL) collectives never
interleave with ours. The per-step agreement runs in the background between two
``maybe_save`` calls, so with several ranks a signal or a timed save acts one call later than
in a single process, on every rank at the same step. Only rank 0 deletes old checkpoints.
"""

from __future__ import annotations

import errno
import math
import signal
import time
import warnings
import weakref
from typing import Any, Callable

from .. import incremental as incremental_mod, knobs, observe
from ..format import retire
from ..api import load, save
from ..asyncsave import async_save as start_async_save
from ..format.root import is_committed
from ..errors import (CheckpointError, CheckpointNotFoundError, RootLeaseError,
                     StateMismatchError, StorageError, StorageNotADirectoryError,
                     UnsupportedValueError)
from ..export import export_weights as export_checkpoint_weights
from ..dist.groups import RankAgreement
from .layout import (LATEST_NAME, STEP_NAME, collect_garbage, entries, replace_file,
                     step_name)
from .lease import take_for_job
from .preemption import EXIT_GRACE_EXPIRED, EXIT_PREEMPTED, PreemptionWatcher
from ..format.opening import open_manifest
from .retention import best_steps, to_keep
from .rootinfo import write_info
from ..storage import open_storage
from .tiers import LocalTier

__all__ = ["CheckpointManager", "EXIT_PREEMPTED", "EXIT_GRACE_EXPIRED", "step_name"]

META_KEY = "shardckpt.manager"
# Errors that say more about the target or the storage than about one checkpoint (the state does
# not fit, an outage). Restore still tries older checkpoints, but when none loads it raises the
# newest such error instead of returning None: starting afresh would be wrong, and the next
# save's retention would delete the checkpoints that could not be read.
_FATAL_ON_RESTORE = (StateMismatchError, UnsupportedValueError, StorageError)


def _fatal(error: Exception | None) -> bool:
    """Whether a failed restore is ``_FATAL_ON_RESTORE``; a file where a folder belongs or a
    link loop is damage to that one checkpoint."""
    return isinstance(error, _FATAL_ON_RESTORE) and not isinstance(
        error, StorageNotADirectoryError) and getattr(error, "errno", None) != errno.ELOOP


def join(root: str, name: str) -> str:
    """``root/name`` for local paths and URLs alike."""
    return f"{root.rstrip('/')}/{name}"


def _json_metrics(metrics: dict | None) -> dict | None:
    """Metrics as JSON numbers (tensors and numpy scalars become floats; NaN becomes None)."""
    if metrics is None:
        return None
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None  # JSON has no NaN / inf; such a step ranks as having no metric
        out[str(k)] = v
    return out


class CheckpointManager:
    """Save every N steps or seconds, keep the last and the best, survive preemption, resume.

    Args:
        root: folder (or storage URL) holding one folder per checkpoint, created if missing.
        every_n_steps: ``maybe_save`` saves when ``step % every_n_steps == 0``.
        every_n_seconds: ``maybe_save`` saves when this long has passed since the last save
            (or since construction / restore).
        keep_last: keep the newest N committed checkpoints (None: no limit by age).
        keep_best: also keep the best N by ``monitor`` (None: none kept for being best).
            With neither limit every checkpoint is kept. The newest committed checkpoint and a
            checkpoint in flight are never deleted.
        monitor: the metric name (a key of ``metrics``) that ranks checkpoints.
        mode: ``"min"`` or ``"max"``: which end of ``monitor`` is best.
        save_last: keep a small ``latest`` file in ``root`` naming the newest committed
            checkpoint, for tools and people (``restore`` lists the folders and does not rely
            on it).
        async_save: save in the background (the loop stalls only for the copy).
        guard: an optimizer or a list of them, for ``async_save``: the tensors they own are
            copied in the background and their ``step()`` waits for the copy (see
            ``shardckpt.async_save``). Optimizers inside the state are guards anyway.
        handle_preemption: install handlers for ``preemption_signals`` (main thread only).
        preemption_signals: signals that announce preemption.
        grace_seconds: from a preemption signal, the time allowed to commit before the process
            exits with ``EXIT_GRACE_EXPIRED`` (default: knob ``grace_seconds``).
        storage_options: passed to the storage backend.
        save_options: extra keyword arguments for every ``save`` / ``async_save`` (codec, ...).
        load_options: extra keyword arguments for ``load`` in ``restore`` (e.g.
            ``per_rank="rank0"`` to resume per-rank values on another world size).
        incremental: each save references the chunks the previous committed checkpoint already
            stores instead of writing them again (``save(..., base=...)``, FORMAT.md 3.6);
            retention then keeps the files that newer checkpoints reference. A referenced chunk
            is checked (its file's size, its CRC-32C) before its first reference in the
            process; a damaged one is written again from the live state.
        full_every: with ``incremental``, every ``full_every``-th save writes every chunk
            (None: only the first). A chunk damaged after it was checked breaks every
            checkpoint that references it; the full save bounds that to fewer than
            ``full_every`` saves, and lets retention free the old chain. 10 costs one full
            write per ten saves.
        clock: a monotonic clock in seconds (tests replace it).
        local_dir: node-local folder for the local tier (``{node}`` becomes the node index;
            see shardckpt/manage/tiers.py and README "Local tier"). None: no local tier.
        local_every_n_steps: ``maybe_save`` also saves to ``local_dir`` when
            ``step % local_every_n_steps == 0``: the state is copied into the tier's own
            staging arena (``save_options['staging_budget_bytes']``) and the rest runs in the background; a
            step whose previous local save still runs is skipped, with a counted warning;
            a failure is a warning at the next call (tiers.py ``save_async``).
        local_on_busy: ``"skip"`` (default) a local step while the previous local save runs,
            with a counted warning, or ``"wait"`` for it (every such step then commits).
        replicas: other nodes that receive a copy of each rank's local data.
        local_keep: committed local checkpoints each node keeps.
        promote_local: a durable save at the step the local tier has just committed copies the
            local checkpoint's encoded files instead of staging the state again (synchronously).
        on_event: called with a ``shardckpt.observe.CheckpointEvent`` for each save started,
            committed or failed, each restore, removal and preemption (on every rank; byte
            counts are the rank's own). Exceptions it raises are logged, not propagated.
        lease: hold the root's lease (lease.py), so that a second manager on the same root
            fails with RootLeaseError naming this one; rank 0 holds it for the whole job.
            False: a follower that only restores and lists (it must not save).

    Raises:
        RootLeaseError: (every rank) another live manager holds ``root``.

    Construct it on every rank, in the same order as other process groups: it creates one.
    Use it as a context manager, or call ``close()``: that flushes the save in flight and
    removes the signal handlers.
    """

    def __init__(self, root, *, every_n_steps: int | None = None,
                 every_n_seconds: float | None = None, keep_last: int | None = None,
                 keep_best: int | None = None, monitor: str | None = None, mode: str = "min",
                 save_last: bool = True, async_save: bool = True, handle_preemption: bool = True,
                 preemption_signals=(signal.SIGTERM,), grace_seconds: float | None = None,
                 storage_options: dict | None = None, save_options: dict | None = None,
                 load_options: dict | None = None, guard=None, incremental: bool = False,
                 full_every: int | None = 10,
                 clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[observe.CheckpointEvent], None] | None = None,
                 local_dir=None, local_every_n_steps: int | None = None, replicas: int = 1,
                 local_keep: int = 1, promote_local: bool = False, local_on_busy: str = "skip",
                 lease: bool = True):
        for name, value in (("every_n_steps", every_n_steps), ("keep_last", keep_last),
                            ("keep_best", keep_best), ("local_every_n_steps", local_every_n_steps),
                            ("full_every", full_every)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, not {value!r}")
        if every_n_seconds is not None and not every_n_seconds > 0:
            raise ValueError(f"every_n_seconds must be > 0, not {every_n_seconds!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        if keep_best is not None and monitor is None:
            raise ValueError("keep_best needs monitor= (the metric that ranks checkpoints)")
        self.root = str(root)
        self.every_n_steps, self.every_n_seconds = every_n_steps, every_n_seconds
        self.keep_last, self.keep_best = keep_last, keep_best
        self.monitor, self.mode, self.save_last = monitor, mode, save_last
        self.async_save, self.guard, self.incremental = async_save, guard, incremental
        self.full_every = full_every
        self.storage_options = storage_options
        self.save_options = dict(save_options or {})
        self.load_options = dict(load_options or {})
        self._clock = clock
        self._on_event = on_event
        self._storage = open_storage(self.root, storage_options)
        self._storage.makedirs("")
        self._ranks = RankAgreement(float(knobs.get("dist_timeout")))
        self._lease = self._take_root(lease)
        self._metrics: dict[int, dict | None] = {}
        self._inflight = None  # (step, metrics, handle)
        self._last_step: int | None = None
        self._last_time = clock()
        self._preempted = False
        grace = float(knobs.get("grace_seconds")) if grace_seconds is None else grace_seconds
        self._watcher = (PreemptionWatcher(tuple(preemption_signals), grace)
                         if handle_preemption else None)
        self.local_every_n_steps, self.promote_local = local_every_n_steps, promote_local
        self._tier = (LocalTier(local_dir, replicas=replicas, keep=local_keep,
                                save_options=self.save_options,
                                staging_budget_bytes=self.save_options.get("staging_budget_bytes"),
                                on_busy=local_on_busy, durable=self._storage)
                      if local_dir is not None else None)

    def _take_root(self, lease: bool):
        """Rank 0 takes the root's lease; every rank raises if another manager holds it."""
        self._info_due = True  # record monitor and mode with the first commit (rootinfo.py)
        try:
            held = take_for_job(self._storage, self._ranks, float(knobs.get("lease_seconds"))) \
                if lease else None
        except BaseException:
            self._ranks.close()
            raise
        if held is not None:  # a dropped manager lets go of its root (also at exit)
            weakref.finalize(self, held.release)
        return held

    def _record_info(self) -> None:
        """Rank 0, at the first commit: ``monitor`` and ``mode`` into the root, for ``ls``."""
        self._info_due = False
        try:
            write_info(self._storage, self.monitor, self.mode)
        except (OSError, CheckpointError) as exc:
            warnings.warn(f"shardckpt: cannot record monitor and mode in {self.root}: {exc}",
                          stacklevel=4)

    def _check_root(self) -> None:
        """Before a save (collective): stop on every rank when rank 0 lost the root's lease."""
        lost = ""
        if self._lease is not None:
            try:
                self._lease.check()
            except RootLeaseError as exc:
                lost = str(exc)
        if self._ranks.max(int(bool(lost)))[0]:
            raise RootLeaseError(lost or "(rank 0) this CheckpointManager no longer holds its "
                                 "root; nothing more is saved or deleted")

    # ----------------------------------------------------------------- queries
    def path(self, step: int) -> str:
        """Where the checkpoint of ``step`` lives."""
        return join(self.root, step_name(step))

    def steps(self) -> list[int]:
        """Committed steps, ascending (in-flight and interrupted saves are not listed)."""
        found = sorted(int(m.group(1)) for n in self._storage.list("")
                       if (m := STEP_NAME.fullmatch(n)))
        return [s for s in found if is_committed(self._storage, step_name(s))]

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with ``step`` (None when it had none)."""
        if step not in self._metrics:
            try:
                meta = open_manifest(self._storage, step_name(step)).metadata
            except CheckpointError:
                return None  # unreadable: it ranks as having no metric
            self._metrics[step] = (meta.get(META_KEY) or {}).get("metrics")
        return self._metrics[step]

    def best_step(self) -> int | None:
        """The committed step with the best ``monitor`` value (None without any)."""
        steps = self.steps()
        ranked = best_steps(steps, {s: self.metrics(s) for s in steps}, self.monitor,
                            self.mode, 1)
        return ranked[0] if ranked else None

    @property
    def preempted(self) -> bool:
        """A preemption checkpoint has committed: the training loop should exit (with
        ``EXIT_PREEMPTED`` so that launchers restart it)."""
        return self._preempted

    @property
    def preemption_requested(self) -> bool:
        """A preemption signal reached this process; its checkpoint may not have started yet
        (a loop that waits for something should stop waiting and call ``maybe_save``)."""
        return self._watcher is not None and self._watcher.pending

    # ----------------------------------------------------------------- saving
    def maybe_save(self, step: int, state_dict: Any, metrics: dict | None = None) -> bool:
        """Save when a save is due (steps or seconds) or a preemption signal arrived.

        Collective: every rank calls it at every step. On preemption the save is flushed and
        committed before it returns, and ``preempted`` becomes true.

        Returns:
            whether a save was started (or, on preemption, committed) at this step.

        Raises:
            the previous background save's error, if it failed.
        """
        self._reap()
        if self._preempted:
            return False
        if self._tier is not None and self.local_every_n_steps and \
                step % self.local_every_n_steps == 0:
            self._tier.save_async(step, state_dict, {META_KEY: {
                "step": step, "metrics": _json_metrics(metrics), "reason": "local",
                "unix_time": time.time()}})
        if not self._ranks.dist:
            return self._decide(step, state_dict, metrics, *self._local_flags())
        # Agreed one call late (see RankAgreement.collect): no rank waits for the others here.
        agreed = self._ranks.collect(2)
        try:
            return self._decide(step, state_dict, metrics, *agreed)
        finally:
            self._ranks.post(*self._local_flags())  # after a save reset the timer

    def _local_flags(self) -> tuple[int, int]:
        """(a preemption signal reached this process, this process's clock says save)."""
        signalled = int(self._watcher is not None and self._watcher.pending)
        timed = int(self.every_n_seconds is not None
                    and self._clock() - self._last_time >= self.every_n_seconds)
        return signalled, timed

    def _decide(self, step: int, state_dict, metrics, signalled: int, timed: int) -> bool:
        if signalled:
            if self._watcher is not None:
                self._watcher.arm()  # the grace period holds on every rank, signalled or not
            if self._last_step != step:
                self._start(step, state_dict, metrics, "preemption")
            self.wait()
            self._preempted = True
            self._emit(observe.PREEMPTED, step)
            if self._watcher is not None:
                self._watcher.committed()
            return True
        due = timed or (self.every_n_steps is not None and step % self.every_n_steps == 0)
        if not due or self._last_step == step:
            return False
        self._start(step, state_dict, metrics, "periodic")
        return True

    def save(self, step: int, state_dict: Any, metrics: dict | None = None) -> None:
        """Save now (in the background when ``async_save``); replaces a checkpoint of the same
        step. Collective."""
        self._start(step, state_dict, metrics, "manual")

    def wait(self) -> None:
        """Wait for the save in flight to commit (and apply retention); raises its error."""
        if self._inflight is None:
            return
        step, metrics, handle = self._inflight
        self._inflight = None
        try:
            info = handle.result()
        except BaseException as exc:
            self._emit(observe.SAVE_FAILED, step, error=f"{type(exc).__name__}: {exc}")
            raise
        self._committed(step, metrics, info)

    def _reap(self) -> None:
        if self._inflight is not None and self._inflight[2].done():
            self.wait()

    def _start(self, step: int, state_dict, metrics, reason: str) -> None:
        self.wait()  # one save at a time; its retention runs before the next starts
        self._check_root()
        metrics = _json_metrics(metrics)
        options = dict(self.save_options)
        meta = {**(options.pop("metadata", None) or {}),  # the user's own keys are kept
                META_KEY: {"step": step, "metrics": metrics, "reason": reason,
                           "unix_time": time.time()}}
        options.pop("overwrite", None)  # a step's checkpoint is always replaced
        kwargs = {"storage_options": self.storage_options, **options, "metadata": meta,
                  "overwrite": True}
        if self.incremental:  # the newest other committed step is the base (all ranks see it)
            previous = [s for s in self.steps() if s != step]
            base, meta[META_KEY]["chain"] = incremental_mod.managed_base(
                self._storage, step_name(previous[-1]) if previous else None, self.full_every,
                META_KEY)
            kwargs.update(content_hashes=True, base=base)
        self._last_step, self._last_time = step, self._clock()
        if self.promote_local and self._tier is not None and \
                self._tier.promote_or_warn(step, self._storage, step_name(step)):
            self._committed(step, metrics)
            return
        if self.async_save:
            handle = start_async_save(state_dict, self.path(step), guard=self.guard, **kwargs)
            self._inflight = (step, metrics, handle)
            self._emit(observe.SAVE_STARTED, step, reason=reason, metrics=metrics,
                       stall_seconds=handle.stall_seconds)
        else:
            info = save(state_dict, self.path(step), **kwargs)
            self._emit(observe.SAVE_STARTED, step, reason=reason, metrics=metrics,
                       stall_seconds=info.seconds)
            self._committed(step, metrics, info)

    def _emit(self, kind: str, step, **fields) -> None:
        """Hand one event to ``on_event`` (a failing callback never breaks the training)."""
        if self._on_event is None:
            return
        path = self.path(step) if step is not None else self.root
        try:
            self._on_event(observe.CheckpointEvent(kind, step, path, **fields))
        except Exception:
            observe.logger.exception("shardckpt: on_event callback failed on %s", kind)

    def _committed(self, step: int, metrics: dict | None, info=None) -> None:
        self._metrics[step] = metrics
        if info is not None:
            self._emit(observe.SAVE_COMMITTED, step, metrics=metrics, seconds=info.seconds,
                       raw_bytes=info.raw_bytes, stored_bytes=info.stored_bytes)
        if self._ranks.rank != 0:
            return
        if self._lease is not None:
            try:  # another job took the root: its checkpoints are not ours to delete
                self._lease.check()
            except RootLeaseError as exc:
                warnings.warn(f"shardckpt: {step_name(step)} committed, but {exc}; latest "
                              "and retention skipped", stacklevel=3)
                return
        if self._info_due:
            self._record_info()
        if self.save_last:
            self._write_latest(step)
        self._apply_retention()

    def _write_latest(self, step: int) -> None:
        """Point ``latest`` at ``step``; the step has committed whatever happens here, and
        ``restore`` does not need the file, so a failure is a warning."""
        try:
            replace_file(self._storage, LATEST_NAME, f"{step_name(step)}\n".encode(), "latest")
        except (OSError, CheckpointError) as exc:
            warnings.warn(f"shardckpt: {step_name(step)} committed, but {LATEST_NAME} could "
                          f"not be updated: {type(exc).__name__}: {exc}", stacklevel=3)

    def _apply_retention(self) -> None:
        if self.keep_last is None and self.keep_best is None:
            return
        steps = self.steps()
        metrics = {s: self.metrics(s) for s in steps} if self.keep_best else {}
        protect = {self._inflight[0]} if self._inflight else set()
        keep = to_keep(steps, metrics, keep_last=self.keep_last, keep_best=self.keep_best,
                       monitor=self.monitor, mode=self.mode, protect=protect)
        removed = [step for step in steps if step not in keep]
        for step in removed:
            self._remove(step_name(step))
            self._metrics.pop(step, None)
            self._emit(observe.REMOVED, step)
        if removed:  # earlier retired folders whose last user just went
            retire.sweep_all(self._storage)

    def _remove(self, name: str) -> None:
        """Delete a checkpoint so that it is never seen half-deleted: renamed out of sight first
        where renames are atomic, otherwise its manifest (the commit marker) goes first. Files
        that newer checkpoints reference stay (retire.py)."""
        retire.remove_checkpoint(self._storage, name)

    # ----------------------------------------------------------------- loading
    def restore(self, state_dict: Any, step: int | None = None, **load_options) -> int | None:
        """Load the newest checkpoint that loads cleanly into ``state_dict``; its step.

        A checkpoint that fails to load with any CheckpointError (incomplete, damaged,
        unreadable) is skipped with a warning and a log line naming it and why, and the next
        older one is tried. With ``step`` exactly that step is loaded, or an error raised.
        Collective.

        Returns:
            the step loaded, or None when there is no checkpoint, or none that loads and each
            failed for a fault of its own (a fresh start).

        Raises:
            CheckpointNotFoundError: ``step`` was given and is not committed.
            StateMismatchError, StorageError: no checkpoint loaded and the newest such error was
                about the state or the storage, not one checkpoint (``_FATAL_ON_RESTORE``).
        """
        self.wait()
        options = {"storage_options": self.storage_options, **self.load_options, **load_options}
        candidates = self._ranks.rank0_list(self._restorable())
        if self._tier is not None and step is None:
            local = self._tier.restore(state_dict, candidates[-1] - 1 if candidates else None,
                                       options)
            if local is not None:
                return self._restored(local)
        if step is not None:
            if step not in candidates:
                raise CheckpointNotFoundError(f"{self.path(step)}: no committed checkpoint")
            load(state_dict, self.path(step), **options)
            return self._restored(step)
        fatal = None  # the newest error that is not one checkpoint's fault
        for s in reversed(candidates):
            error = None
            try:
                load(state_dict, self.path(s), **options)
            except CheckpointError as exc:
                error = exc
            verdict = 0 if error is None else 2 if _fatal(error) else 1
            (verdict,) = self._ranks.max(verdict)
            if verdict == 0:
                return self._restored(s)
            if verdict == 2 and fatal is None:
                fatal = error if _fatal(error) else CheckpointError(
                    f"{self.path(s)}: restore failed on another rank")
            why = f"{type(error).__name__}: {error}" if error else "another rank failed"
            observe.logger.warning("shardckpt: restore skips %s: %s", self.path(s), why)
            warnings.warn(f"shardckpt: skipping {self.path(s)}: {why}", stacklevel=2)
        if fatal is not None:
            raise fatal
        return None

    def _restorable(self) -> list[int]:
        """Committed steps and those this process cannot look into (they may be committed:
        restore tries them, and says why it skips them), ascending."""
        return sorted(e.step for e in entries(self._storage)
                      if e.kind in ("committed", "unreadable"))

    def _restored(self, step: int) -> int:
        self._last_step, self._last_time = step, self._clock()
        self._emit(observe.RESTORED, step, metrics=self.metrics(step))
        return step

    def cleanup(self, older_than: float = 3600.0, dry_run: bool = False) -> list[dict]:
        """Remove what interrupted saves left under the root (rank 0 only; never a committed
        checkpoint, never the save in flight, nothing younger than ``older_than`` seconds).
        Returns a row per leftover removed (see ``shardckpt.layout.collect_garbage``)."""
        self.wait()
        if self._ranks.rank != 0:
            return []
        removed, _ = collect_garbage(self._storage, older_than, dry_run)
        return removed

    # ----------------------------------------------------------------- export, close
    def export_weights(self, step: int, dest, format: str = "safetensors", *,
                       key: str | None = "model", prefix: str = "") -> dict:
        """Write the weights (the ``key`` subtree) of ``step`` to one deployable file.

        See ``shardckpt.export.export_weights``; runs on the calling rank only.
        """
        if step not in self.steps():
            raise CheckpointNotFoundError(f"{self.path(step)}: no committed checkpoint")
        return export_checkpoint_weights(self.path(step), dest, format=format, key=key,
                                         prefix=prefix, storage_options=self.storage_options)

    def close(self) -> None:
        """Flush the save in flight, remove the signal handlers and the manager's group."""
        try:
            self.wait()
        finally:
            if self._watcher is not None:
                self._watcher.close()
                self._watcher = None
            if self._tier is not None:
                self._tier.close()
            self._ranks.close()
            if self._lease is not None:
                self._lease.release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the loop's own exception matters more than a failed flush
            self.close()
        except Exception as flush_error:
            warnings.warn(f"shardckpt: the save in flight failed while the training loop was "
                          f"already raising: {type(flush_error).__name__}: {flush_error}")
