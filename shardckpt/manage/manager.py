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

import dataclasses
import time
import warnings
import weakref
from typing import Any

from ..save import async_save as start_async_save, managed_base
from .. import knobs, observe
from ..api import load, save
from ..format.root import is_committed
from ..errors import (CheckpointError, CheckpointNotFoundError, NoResumableCheckpointError,
                      RootLeaseError)
from ..ops.export import export_weights as export_checkpoint_weights
from ..dist.groups import RankAgreement
from .layout import STEP_NAME, collect_garbage, entries, step_name
from .lease import take_for_job
from .preemption import EXIT_GRACE_EXPIRED, EXIT_PREEMPTED, PreemptionWatcher
from ..format.opening import open_manifest
from .config import ManagerConfig
from .verdict import FATAL, OK, agreed_error, try_load
from .history import History, json_epoch, json_metrics
from .pruning import Pruning, history_rows, is_demoted, write_latest
from .retention import best_steps
from .schedule import Flight, Restored, Schedule, keep_rule, monitor_of, save_rule
from .rootinfo import write_info
from ..storage import open_storage
from .tier.local import LocalTier

__all__ = ["CheckpointManager", "EXIT_PREEMPTED", "EXIT_GRACE_EXPIRED", "step_name"]

META_KEY = "shardckpt.manager"


def join(root: str, name: str) -> str:
    """``root/name`` for local paths and URLs alike."""
    return f"{root.rstrip('/')}/{name}"


class CheckpointManager:
    """Save by rules (steps, epochs, time, improvement...), keep and demote by rules, survive
    preemption, resume (docs/policies.md).

    Args:
        root: folder (or storage URL) holding one folder per checkpoint, created if missing.
        config: a ``ManagerConfig`` (manage/config.py documents every option and default).
        **options: any ``ManagerConfig`` field as a keyword, over ``config``'s.

    Raises:
        RootLeaseError: (every rank) another live manager holds ``root``.

    Construct it on every rank, in the same order as other process groups: it creates one.
    Use it as a context manager, or call ``close()``: that flushes the save in flight and
    removes the signal handlers.
    """

    def __init__(self, root, config: ManagerConfig | None = None, **options):
        c = dataclasses.replace(config or ManagerConfig(), **options)
        c.check()
        self.config = c
        self.root = str(root)
        self.every_n_steps, self.every_n_seconds = c.every_n_steps, c.every_n_seconds
        self.keep_last, self.keep_best = c.keep_last, c.keep_best
        self.save_rule = save_rule(c.save, c.every_n_steps, c.every_n_seconds)
        self.keep_rule = keep_rule(c.keep, c.keep_last, c.keep_best, c.monitor, c.mode)
        self.monitor, self.mode = monitor_of(c.monitor, c.mode, self.save_rule, self.keep_rule,
                                             c.demote)
        self.save_last = c.save_last
        self.async_save, self.guard, self.incremental = c.async_save, c.guard, c.incremental
        self.full_every = c.full_every
        self.storage_options = c.storage_options
        self.save_options = dict(c.save_options or {})
        self.load_options = dict(c.load_options or {})
        self._clock = c.clock
        self._on_event = c.on_event
        self._storage = open_storage(self.root, c.storage_options)
        self._storage.makedirs("")
        self._ranks = RankAgreement(float(knobs.get("dist_timeout")))
        self._lease = self._take_root(c.lease)
        self._metrics: dict[int, dict | None] = {}
        self._inflight: Flight | None = None
        self._last_step: int | None = None
        self._preempted, self._clean = False, True
        self._schedule = Schedule(self.save_rule, self.keep_rule, c.demote, self.monitor,
                                  self.mode, self._ranks, History(self._storage), c.clock)
        if self.save_rule is not None:  # for Initial(): the same answer on every rank
            self._schedule.facts.has_checkpoint = bool(self._ranks.rank0_list(
                [int(bool(self.steps()))])[0])
        self._pruning = Pruning(self._storage, self._schedule, self.metrics, self._emit)
        grace = (float(knobs.get("grace_seconds")) if c.grace_seconds is None
                 else c.grace_seconds)
        self._watcher = (PreemptionWatcher(tuple(c.preemption_signals), grace)
                         if c.handle_preemption else None)
        self.local_every_n_steps, self.promote_local = c.local_every_n_steps, c.promote_local
        self._tier = (LocalTier(c.local_dir, replicas=c.replicas, keep=c.local_keep,
                                save_options=self.save_options,
                                staging_budget_bytes=self.save_options.get("staging_budget_bytes"),
                                on_busy=c.local_on_busy, durable=self._storage, clock=c.clock)
                      if c.local_dir is not None else None)
        local_rule = save_rule(c.local_save, c.local_every_n_steps, None,
                               "local_save= or local_every_n_steps")
        self._local = (Schedule(local_rule, None, None, self.monitor, self.mode, self._ranks,
                                self._schedule.history, c.clock, self._tier.completions)
                       if self._tier is not None and local_rule is not None else None)

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
            meta = self._meta(step)
            if meta is None:
                return None  # unreadable: it ranks as having no metric
            self._metrics[step] = meta.get("metrics")
        return self._metrics[step]

    def _meta(self, step: int) -> dict | None:
        """The manager's metadata of ``step`` ({} without; None when it cannot be read)."""
        try:
            meta = open_manifest(self._storage, step_name(step)).metadata
        except CheckpointError:
            return None
        return meta.get(META_KEY) or {}

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
    def maybe_save(self, step: int, state_dict: Any, metrics: dict | None = None,
                   epoch: float | None = None) -> bool:
        """Save when the save rule says so (``save=``) or a preemption signal arrived.

        Collective: every rank calls it at every step. On preemption the save is flushed and
        committed before it returns, and ``preempted`` becomes true. ``epoch``: the epochs
        completed (an int, or a float such as HF's ``state.epoch``), stored with the checkpoint
        and read by ``EveryNEpochs``. A rule that reads a metric uses rank 0's.

        Returns:
            whether a save was started (or, on preemption, committed) at this step.

        Raises:
            the previous background save's error, if it failed; MetricNotFoundError when a
            rule checks a metric that ``metrics`` lacks.
        """
        self._reap()
        if self._preempted:
            return False
        dist, durable = self._ranks.dist, 1 + self._schedule.flag_count()
        # With ranks, agreed one call late (RankAgreement.collect): no rank waits for others.
        flags = self._ranks.collect(len(self._local_flags())) if dist else self._local_flags()
        try:
            if self._local is not None:
                self._local.save_local(self._tier, step, state_dict, metrics, epoch,
                                       flags[durable:])
            return self._decide(step, state_dict, metrics, epoch, flags[:durable])
        finally:
            if dist:
                self._ranks.post(*self._local_flags())  # after a save reset the timer

    def _local_flags(self) -> list[int]:
        """[preemption signalled here, the clocked rules' flags: durable, then local tier]."""
        self._schedule.facts.busy = self._inflight is not None
        signalled = int(self._watcher is not None and self._watcher.pending)
        local = self._local.local_flags() if self._local is not None else []
        return [signalled, *self._schedule.local_flags(), *local]

    def _decide(self, step: int, state_dict, metrics, epoch, flags: list[int]) -> bool:
        if flags[0]:  # a preemption signal: saved whatever the rules say
            if self._watcher is not None:
                self._watcher.arm()  # the grace period holds on every rank, signalled or not
            if self._last_step != step:
                self._start(step, state_dict, metrics, "preemption", epoch)
            self.wait()
            self._preempted = True
            self._emit(observe.PREEMPTED, step)
            if self._watcher is not None:
                self._watcher.committed()
            return True
        if self._last_step == step:  # saved at this step already
            self._schedule.check(step, epoch, metrics, flags[1:], skip=True)
            return False
        reason = self._schedule.check(step, epoch, metrics, flags[1:])
        if reason is None:
            return False
        self._start(step, state_dict, metrics, reason, epoch)
        return True

    def save(self, step: int, state_dict: Any, metrics: dict | None = None,
             epoch: float | None = None) -> None:
        """Save now, whatever the save rule says (a manual or final save; in the background
        when ``async_save``); replaces a checkpoint of the same step. Collective."""
        self._start(step, state_dict, metrics, "manual", epoch)

    def wait(self) -> None:
        """Wait for the save in flight to commit (and apply retention); raises its error."""
        if self._inflight is None:
            return
        flight, self._inflight = self._inflight, None
        try:
            info = flight.handle.result()
        except BaseException as exc:
            self._schedule.settled(flight.step)
            self._emit(observe.SAVE_FAILED, flight.step, error=f"{type(exc).__name__}: {exc}")
            raise
        self._committed(flight, info)

    def _reap(self) -> None:
        if self._inflight is not None and self._inflight.handle.done():
            self.wait()

    def _start(self, step: int, state_dict, metrics, reason: str, epoch=None) -> None:
        self.wait()  # one save at a time; its retention runs before the next starts
        self._check_root()
        metrics, epoch = json_metrics(metrics), json_epoch(epoch)
        options = dict(self.save_options)
        meta = {**(options.pop("metadata", None) or {}),  # the user's own keys are kept
                META_KEY: {"step": step, "epoch": epoch, "metrics": metrics, "reason": reason,
                           "kind": "full", "unix_time": time.time()}}
        options.pop("overwrite", None)  # a step's checkpoint is always replaced
        kwargs = {"storage_options": self.storage_options, **options, "metadata": meta,
                  "overwrite": True}
        if self.incremental:  # the newest other committed step is the base (all ranks see it)
            previous = [s for s in self.steps() if s != step]
            base, meta[META_KEY]["chain"] = managed_base(
                self._storage, step_name(previous[-1]) if previous else None, self.full_every,
                META_KEY)
            kwargs.update(content_hashes=True, base=base)
            meta[META_KEY]["kind"] = "incremental" if base else "full"
        self._last_step = step
        self._schedule.started(step, metrics)
        flight = Flight(step, metrics, epoch, reason, self._clock())
        if self.promote_local and self._tier is not None and \
                self._tier.promote_or_warn(step, self._storage, step_name(step)):
            self._committed(flight)
            return
        if self.async_save:
            flight.handle = start_async_save(state_dict, self.path(step), guard=self.guard,
                                             **kwargs)
            self._inflight, flight.stall = flight, flight.handle.stall_seconds
            self._emit(observe.SAVE_STARTED, step, reason=reason, metrics=metrics,
                       stall_seconds=flight.stall)
        else:
            info = save(state_dict, self.path(step), **kwargs)
            flight.stall = info.seconds
            self._emit(observe.SAVE_STARTED, step, reason=reason, metrics=metrics,
                       stall_seconds=info.seconds)
            self._committed(flight, info)

    def _emit(self, kind: str, step, **fields) -> None:
        """Hand one event to ``on_event`` (a failing callback never breaks the training)."""
        if self._on_event is not None:
            observe.emit(self._on_event, kind, step,
                         self.path(step) if step is not None else self.root, **fields)

    def _committed(self, flight: Flight, info=None) -> None:
        step, metrics = flight.step, flight.metrics
        self._metrics[step] = metrics
        self._schedule.cost(flight.stall, self._clock() - flight.started)
        self._schedule.settled(step)  # rank 0 records its metrics in the history below
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
            write_latest(self._storage, step)
        self._pruning.record(step, epoch=flight.epoch, metrics=metrics, reason=flight.reason,
                             stall_s=flight.stall, seconds=self._clock() - flight.started,
                             unix_time=time.time())
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Rank 0: remove what the keep rule drops, demote what ``demote`` does not keep full
        (pruning.py), and store the history."""
        protect = {self._inflight.step} if self._inflight else set()
        for step in self._pruning.apply(self.steps(), protect):
            self._metrics.pop(step, None)

    def history(self) -> list[dict]:
        """One record per checkpoint the root ever held, by step (any rank): ``step``,
        ``epoch``, ``metrics``, ``reason``, ``kind`` (full, incremental, weights),
        ``written_bytes``, ``referenced_bytes``, ``state`` (kept, demoted, removed), timings."""
        return history_rows(self._storage, self.steps())

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
                about the state or the storage, not one checkpoint (``verdict.FATAL_ERRORS``).
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
            if is_demoted(self._storage, step):
                raise NoResumableCheckpointError(f"{self.path(step)}: demoted to weights only; "
                                                 "it has no optimizer state to resume from")
            load(state_dict, self.path(step), **options)
            return self._restored(step)
        fatal, weights = None, []  # the newest error not one checkpoint's fault; demoted ones
        for s in reversed(candidates):
            if self._ranks.rank0_list([int(self._ranks.rank == 0 and is_demoted(self._storage, s))])[0]:
                weights.append(s)  # no optimizer state: never resumed from
                continue
            verdict, error = try_load(state_dict, self.path(s), options)
            (verdict,) = self._ranks.max(verdict)
            if verdict == OK:
                return self._restored(s)
            if verdict == FATAL and fatal is None:
                fatal = agreed_error(error, self.path(s))
            why = f"{type(error).__name__}: {error}" if error else "another rank failed"
            observe.logger.warning("shardckpt: restore skips %s: %s", self.path(s), why)
            warnings.warn(f"shardckpt: skipping {self.path(s)}: {why}", stacklevel=2)
        if fatal is not None:
            raise fatal
        if weights:
            raise NoResumableCheckpointError(
                f"{self.root}: only weights-only (demoted) checkpoints are left to resume from "
                f"({', '.join(step_name(s) for s in weights[:5])}): they hold no optimizer "
                "state; load their weights with shardckpt.load")
        return None


    def _restorable(self) -> list[int]:
        """Committed steps and those this process cannot look into (they may be committed:
        restore tries them, and says why it skips them), ascending."""
        return sorted(e.step for e in entries(self._storage)
                      if e.kind in ("committed", "unreadable"))

    def _restored(self, step: int) -> Restored:
        self._last_step = step
        out = Restored(step, (self._meta(step) or {}).get("epoch"), self.metrics(step))
        for schedule in (self._schedule, self._local):
            if schedule is not None:
                schedule.restored(out.epoch)
        if self._ranks.rank == 0:  # this run, and the unclean end it recovers from, if any
            self._schedule.history.write()
        self._emit(observe.RESTORED, step, metrics=out.metrics)
        return out

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

        See ``shardckpt.ops.export.export_weights``; runs on the calling rank only.
        """
        if step not in self.steps():
            raise CheckpointNotFoundError(f"{self.path(step)}: no committed checkpoint")
        return export_checkpoint_weights(self.path(step), dest, format=format, key=key,
                                         prefix=prefix, storage_options=self.storage_options)

    def close(self) -> None:
        """Flush the save in flight, remove the signal handlers and the manager's group; record
        in the root's history how this run ended."""
        try:
            self.wait()
        finally:
            self._schedule.ended(self._clean, self._ranks.rank == 0)
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
        self._clean = False  # the training raised: the next restore counts a failure
        try:  # the loop's own exception matters more than a failed flush
            self.close()
        except Exception as flush_error:
            warnings.warn(f"shardckpt: the save in flight failed while the training loop was "
                          f"already raising: {type(flush_error).__name__}: {flush_error}")
