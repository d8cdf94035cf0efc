"""The retention pass after each commit (rank 0): remove what the keep rule drops, demote what
``KeepFull`` does not keep full, sweep, and record it all in the root's history.

Runs between saves (the manager waits for the save in flight first), so no save adds a
reference while files are deleted (FORMAT.md 3.6.1, 3.6.4).
"""

from __future__ import annotations

import json
import warnings
from typing import Callable

from .. import observe
from ..errors import CheckpointError
from ..format import demote as demote_mod, retire
from ..format.opening import open_manifest
from ..save import written_split
from .history import History
from .layout import LATEST_NAME, replace_file, step_name
from .schedule import Schedule

META_KEY = "shardckpt.manager"


def kind_of(meta: dict | None, referenced: int | None) -> str:
    """``full``, ``incremental`` (it references earlier checkpoints' files) or ``weights``."""
    if isinstance(meta, dict) and meta.get("kind") == demote_mod.WEIGHTS_KIND:
        return "weights"
    return "incremental" if referenced else "full"


class Pruning:
    """Rank 0's retention pass and history records.

    Args:
        storage: the manager's root.
        schedule: the manager's rules and history.
        metrics_of: ``metrics_of(step)`` -> the metrics a committed step was saved with.
        emit: ``emit(kind, step, **fields)`` -> an observe event.
    """

    def __init__(self, storage, schedule: Schedule, metrics_of: Callable, emit: Callable):
        self.storage, self.schedule = storage, schedule
        self.history = schedule.history
        self.metrics_of, self.emit = metrics_of, emit

    def record(self, step: int, **fields) -> None:
        """A committed checkpoint's history record (sizes and kind read from its manifest)."""
        sizes = {"written_bytes": None, "referenced_bytes": None}
        try:
            sizes = written_split(open_manifest(self.storage, step_name(step)))
        except CheckpointError as exc:  # informative: the record goes without sizes
            warnings.warn(f"shardckpt: {step_name(step)} committed but cannot be read back "
                          f"for its history record: {exc}", stacklevel=4)
        self.history.committed(step, kind=kind_of(None, sizes["referenced_bytes"]),
                               **sizes, **fields)

    def apply(self, steps: list[int], protect: set[int]) -> list[int]:
        """Remove, demote and sweep, then store the history; returns the steps removed."""
        sched = self.schedule
        needs_metrics = sched.keep is not None or sched.demote is not None
        metrics = {s: self.metrics_of(s) for s in steps} if needs_metrics else {}
        ctx = sched.context(steps, metrics)
        keep = sched.to_keep(ctx, protect)
        removed, bases = [s for s in steps if s not in keep], set()
        for step in removed:
            bases |= self._bases(step)
            retire.remove_checkpoint(self.storage, step_name(step))
            self.history.mark(step, "removed")
            self.emit(observe.REMOVED, step)
        demoted = {s for s, r in self.history.records.items() if r.get("state") == "demoted"}
        changed = bool(removed)
        for step in sched.to_demote(ctx, keep - protect, demoted):
            changed |= self._demote(step)
        if changed:  # earlier retired folders whose last user just went
            retire.sweep_all(self.storage)
        for step in sorted(demoted & keep):  # demoted ones whose old files a removed one used
            if step_name(step) in bases:
                self._sweep(step)
        self.history.write()
        return removed

    def _bases(self, step: int) -> set[str]:
        """The checkpoints whose files ``step`` references (read before it is removed)."""
        try:
            m = open_manifest(self.storage, step_name(step))
        except CheckpointError:
            return set()
        return {f.base for f in m.files if f.base is not None}

    def _demote(self, step: int) -> bool:
        name = step_name(step)
        try:
            out = demote_mod.demote(self.storage, name, key=self.schedule.demote.key,
                                    meta_key=META_KEY)
        except (OSError, CheckpointError) as exc:
            # The checkpoint stays loadable (old or new form); the next pass tries again.
            warnings.warn(f"shardckpt: could not demote {name} to weights only: "
                          f"{type(exc).__name__}: {exc}", stacklevel=4)
            return False
        self.history.mark(step, "demoted", kind="weights")
        if not out["demoted"]:  # it already was (a root without history)
            return False
        self.history.records[step]["freed_bytes"] = out["freed_bytes"]
        self.emit(observe.DEMOTED, step)
        return True

    def _sweep(self, step: int) -> None:
        try:
            demote_mod.sweep(self.storage, step_name(step))
        except (OSError, CheckpointError):
            pass  # a later pass sweeps again


def is_demoted(storage, step: int) -> bool:
    """Whether checkpoint ``step`` is weights only (its manifest's metadata, read as plain
    JSON: a parser still reads the checksum member)."""
    try:
        doc = json.loads(storage.read(f"{step_name(step)}/manifest.json"))
    except (OSError, ValueError):
        return False  # the load that follows says what is wrong with it
    return isinstance(doc, dict) and demote_mod.is_weights(doc.get("metadata"), META_KEY)


def history_rows(storage, steps: list[int]) -> list[dict]:
    """The root's history records by step, with the committed ``steps`` it lacks (a root older
    than the history, a save whose record was not written) read from their manifests."""
    records = History(storage).records
    for step in steps:
        if step in records and records[step].get("state") != "removed":
            continue
        try:
            m = open_manifest(storage, step_name(step))
        except CheckpointError:
            continue
        meta = m.metadata.get(META_KEY) or {}
        sizes = written_split(m)
        kind = kind_of(meta, sizes["referenced_bytes"])
        records[step] = {**{k: meta.get(k) for k in ("epoch", "metrics", "reason", "unix_time")},
                         "step": step, "kind": kind, **sizes,
                         "state": "demoted" if kind == "weights" else "kept"}
    return [records[s] for s in sorted(records)]


def write_latest(storage, step: int) -> None:
    """Point ``latest`` at ``step``; the step has committed whatever happens here, and
    ``restore`` does not need the file, so a failure is a warning."""
    try:
        replace_file(storage, LATEST_NAME, f"{step_name(step)}\n".encode(), "latest")
    except (OSError, CheckpointError) as exc:
        warnings.warn(f"shardckpt: {step_name(step)} committed, but {LATEST_NAME} could "
                      f"not be updated: {type(exc).__name__}: {exc}", stacklevel=4)
