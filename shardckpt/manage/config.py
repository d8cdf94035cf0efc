"""The manager's options in one dataclass: what each does, its default, and the checks that
refuse a bad value before anything is created."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Callable

from .keep import KeepFull

__all__ = ["ManagerConfig"]


@dataclass(frozen=True)
class ManagerConfig:
    """Every option of ``CheckpointManager`` (each is also a keyword of its constructor).

    Attributes:
        save: a save rule of ``shardckpt.policy`` (``EveryNEpochs(1) & OnImprovement("val")``):
            when ``maybe_save`` saves. Preemption saves and ``save()`` ignore it.
        keep: a keep rule (``KeepLast(2) | KeepEvery(1000)``): which committed checkpoints
            retention keeps (None: all). The newest and the one in flight are always kept.
        demote: ``KeepFull(last=2, best=1)``: kept checkpoints outside it become weights only
            (format/demote.py). None: none is demoted.
        every_n_steps: ``maybe_save`` saves when ``step % every_n_steps == 0`` (shorthand for
            ``save=EveryNSteps(n)``; with ``every_n_seconds``, the two ``|``-ed).
        every_n_seconds: ``maybe_save`` saves when this long has passed since the last save
            (or since construction / restore): ``save=EveryNSeconds(s)``.
        keep_last: keep the newest N committed checkpoints: ``keep=KeepLast(n)``.
        keep_best: also keep the best N by ``monitor``: ``keep=KeepBest(n, monitor, mode)``
            (with ``keep_last``, the two ``|``-ed).
        monitor: the metric name (a key of ``metrics``) that ranks checkpoints (None: the
            first one a rule names), recorded in the root for ``shardckpt ls``.
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
            see shardckpt/manage/tier/local.py and docs/guide.md "Local tier"). None: no local tier.
        local_every_n_steps: ``maybe_save`` also saves to ``local_dir`` when
            ``step % local_every_n_steps == 0``: the state is copied into the tier's own
            staging arena (``save_options["staging_budget_bytes"]``) and the rest runs in the
            background; a
            step whose previous local save still runs is skipped, with a counted warning;
            a failure is a warning at the next call (tier/local.py ``save_async``).
        local_save: a save rule for the local tier (``Auto()`` picks its interval from the
            tier's own measured stall; ``local_every_n_steps`` is ``EveryNSteps(n)``).
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
    """

    save: object = None
    keep: object = None
    demote: object = None
    every_n_steps: int | None = None
    every_n_seconds: float | None = None
    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: str = "min"
    save_last: bool = True
    async_save: bool = True
    guard: object = None
    incremental: bool = False
    full_every: int | None = 10
    storage_options: dict | None = None
    save_options: dict | None = None
    load_options: dict | None = None
    clock: Callable[[], float] = time.monotonic
    on_event: Callable | None = None
    local_dir: object = None
    local_every_n_steps: int | None = None
    local_save: object = None
    local_on_busy: str = "skip"
    replicas: int = 1
    local_keep: int = 1
    promote_local: bool = False
    handle_preemption: bool = True
    preemption_signals: tuple = (signal.SIGTERM,)
    grace_seconds: float | None = None
    lease: bool = True

    def check(self) -> None:
        """Raise ValueError (TypeError for a ``demote`` that is no ``KeepFull``) naming the
        first option with a bad value."""
        for name in ("every_n_steps", "keep_last", "keep_best", "local_every_n_steps",
                     "full_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, not {value!r}")
        if self.every_n_seconds is not None and not self.every_n_seconds > 0:
            raise ValueError(f"every_n_seconds must be > 0, not {self.every_n_seconds!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {self.mode!r}")
        if self.demote is not None and not isinstance(self.demote, KeepFull):
            raise TypeError(f"demote= takes shardckpt.policy.KeepFull(...), not {self.demote!r}")
        if self.keep_best is not None and self.monitor is None:
            raise ValueError("keep_best needs monitor= (the metric that ranks checkpoints)")
