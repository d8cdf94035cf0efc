"""What every save and load reports: a ``logging`` line, and events for the manager's callback.

Each save and load logs one INFO line on the ``shardckpt`` logger (duration, stall, raw and
stored bytes, throughput); ``CheckpointManager(..., on_event=callback)`` hands the same facts to
the caller as ``CheckpointEvent`` objects, which the TensorBoard writer
(``shardckpt.integrations.tensorboard``) and anyone else can consume. Byte counts are this
rank's own (what it wrote or read), like ``SaveInfo``'s.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger("shardckpt")

# Event kinds, in the order a step's checkpoint sees them.
SAVE_STARTED, SAVE_COMMITTED, SAVE_FAILED = "save_started", "save_committed", "save_failed"
RESTORED, REMOVED, PREEMPTED = "restored", "removed", "preempted"
DEMOTED = "demoted"  # kept, but turned into weights only (CheckpointManager demote=)


@dataclass(frozen=True)
class CheckpointEvent:
    """One thing that happened to a checkpoint of a ``CheckpointManager``.

    ``kind`` is one of ``save_started`` (the state is copied out; ``stall_seconds`` set),
    ``save_committed`` (``seconds``, ``raw_bytes``, ``stored_bytes`` set), ``save_failed``
    (``error``), ``restored`` (``metrics`` of the step loaded), ``removed`` (by retention),
    ``demoted`` (by retention, to its weights only) and ``preempted`` (the preemption
    checkpoint committed). Consumers should let kinds they do not know pass: more may come.
    """

    kind: str
    step: int | None
    path: str
    reason: str | None = None
    stall_seconds: float | None = None
    seconds: float | None = None
    raw_bytes: int | None = None
    stored_bytes: int | None = None
    metrics: dict | None = None
    error: str | None = None
    unix_time: float = field(default_factory=time.time)
    epoch: float | int | None = None  # where the framework counts epochs (Lightning, HF)

    @property
    def ratio(self) -> float | None:
        """raw / stored bytes (the compression ratio), when both are known."""
        if self.raw_bytes and self.stored_bytes:
            return self.raw_bytes / self.stored_bytes
        return None


def emit(callback: Callable | None, kind: str, step: int | None, path: str, **fields) -> None:
    """Hand one ``CheckpointEvent`` to ``callback`` on the calling thread (None: nothing).

    A callback that raises is logged with its traceback and never raised: a tracker or a
    logger must not fail the save or the removal it reports.

    Args:
        callback: the ``on_event`` callable, or None.
        kind, step, path: the event's (see ``CheckpointEvent``).
        fields: its other fields (``metrics``, ``epoch``, ``seconds``...).
    """
    if callback is None:
        return
    try:
        callback(CheckpointEvent(kind, step, path, **fields))
    except Exception:
        logger.exception("shardckpt: on_event callback failed on %s of %s", kind, path)


def event_callback(spec) -> Callable | None:
    """``on_event`` from a config value: a callable as it is, or a dotted import path
    (``"pkg.module.name"`` or ``"pkg.module:name"``) of a callable or of a class that is
    constructed without arguments (``"shardckpt.integrations.wandb.WandbCheckpoints"``).

    Raises:
        ValueError: ``spec`` names nothing importable, or something that is not callable.
    """
    if spec is None or callable(spec):
        return spec
    module, sep, name = str(spec).partition(":")
    if not sep:
        module, _, name = str(spec).rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"on_event {spec!r} cannot be imported: {exc}") from exc
    if isinstance(target, type):
        target = target()
    if not callable(target):
        raise ValueError(f"on_event {spec!r} is not callable")
    return target


def _mib(n: int) -> str:
    """``n`` bytes for a log line: KiB below 1 MiB, else MiB."""
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def throughput(nbytes: int, seconds: float) -> float:
    """Bytes per second (0 for an instant)."""
    return nbytes / seconds if seconds > 0 else 0.0


def log_save(path: str, raw: int, stored: int, seconds: float,
             stall: float | None = None) -> None:
    """The INFO line of one committed save (``stall``: how long the caller was blocked)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    stall_text = f", stall {stall:.3f} s" if stall is not None else ""
    ratio = f"{raw / stored:.2f}x" if stored else "-"
    logger.info("saved %s in %.3f s%s: raw %s, stored %s (%s), %.1f MiB/s", path, seconds,
                stall_text, _mib(raw), _mib(stored), ratio,
                throughput(raw, seconds) / 2**20)


def log_load(path: str, plan, seconds: float) -> None:
    """The INFO line of one load (``plan``: its ``read.ReadPlan``, counted only when logged)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    raw, stored = plan_bytes(plan)
    logger.info("loaded %s in %.3f s: read %s stored, %s raw, %.1f MiB/s", path, seconds,
                _mib(stored), _mib(raw), throughput(raw, seconds) / 2**20)


def plan_bytes(plan) -> tuple[int, int]:
    """(raw, stored) bytes of the chunks a ``read.ReadPlan`` fetches."""
    raw = stored = 0
    for reads in plan.by_file.values():
        for r in reads:
            raw += r.raw_length
            stored += r.ref.length
    return raw, stored
