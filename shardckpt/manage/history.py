"""The manager's history in its root, ``.manager-history.json``: one record per checkpoint ever
saved there (kept, demoted or removed), and the runs of the training that used the root.

What it is for: ``mgr.history()`` and ``shardckpt ls --json`` show what happened to every
checkpoint, including those retention removed; ``OnImprovement`` compares with the best value
ever saved, across restarts; ``Auto`` counts failures (a run that did not end cleanly, followed
by a restore) and the training time they happened in.

Rank 0 writes the file (layout.replace_file: readers see the old or the new bytes) at each
commit, removal, demotion and clean close; every rank reads it when the manager opens the root.
It is informative: nothing needs it to load a checkpoint, a root without it (made before it
existed, or by hand) starts an empty history, and an unreadable one is replaced with a warning.
"""

from __future__ import annotations

import json
import math
import time
import warnings

from ..errors import CheckpointError
from .layout import replace_file

HISTORY_NAME = ".manager-history.json"
FORMAT = 1
MAX_RECORDS = 10000  # the oldest removed records go first beyond this
MAX_RUNS = 1000
STATES = ("kept", "demoted", "removed")


def json_metrics(metrics: dict | None) -> dict | None:
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


def json_epoch(epoch):
    """An epoch as a JSON number (an int stays an int)."""
    if epoch is None:
        return None
    epoch = epoch.item() if hasattr(epoch, "item") else epoch
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else float(epoch)


def _value(metrics, monitor: str) -> float | None:
    v = (metrics or {}).get(monitor)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
        return None
    return float(v)


class History:
    """The root's history, in memory; ``write`` stores it (rank 0).

    Args:
        storage: the manager's root.
    """

    def __init__(self, storage):
        self.storage = storage
        self.records: dict[int, dict] = {}
        self.runs: list[dict] = []
        self.run: dict | None = None  # this process's run, once recorded
        self._read()

    def _read(self) -> None:
        try:
            doc = json.loads(self.storage.read(HISTORY_NAME))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            warnings.warn(f"shardckpt: {self.storage.url(HISTORY_NAME)} cannot be read "
                          f"({type(exc).__name__}: {exc}); starting an empty history",
                          stacklevel=4)
            return
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return
        for r in doc.get("records") or []:
            if isinstance(r, dict) and isinstance(r.get("step"), int):
                self.records[r["step"]] = r
        self.runs = [r for r in doc.get("runs") or [] if isinstance(r, dict)
                     and isinstance(r.get("started"), (int, float))]

    # ----------------------------------------------------------------- runs and failures
    def begin(self, now: float | None = None) -> None:
        """Record this process's run (once)."""
        if self.run is None:
            self.run = {"started": time.time() if now is None else now, "last_seen": None,
                        "ended": None, "clean": None, "failed": False}
            self.runs.append(self.run)
            del self.runs[:-MAX_RUNS]

    def restored(self) -> bool:
        """This run restored a checkpoint: the previous run, if it did not end cleanly, is a
        failure. Returns whether one was counted."""
        self.begin()
        previous = self.runs[-2] if len(self.runs) > 1 else None
        if previous is None or previous.get("clean") or previous.get("failed"):
            return False
        previous["failed"] = True
        return True

    def end(self, clean: bool) -> None:
        """This run ends (``close``), cleanly or with the training's exception."""
        if self.run is not None:
            self.run["ended"], self.run["clean"] = time.time(), bool(clean)

    def failures(self) -> int:
        """Runs that ended uncleanly and were restored from."""
        return sum(bool(r.get("failed")) for r in self.runs)

    def observed_seconds(self) -> float:
        """Training time the recorded runs covered (to their end, else their last save)."""
        total = 0.0
        for r in self.runs:
            end = r.get("ended") or r.get("last_seen")
            if isinstance(end, (int, float)):
                total += max(0.0, end - r["started"])
        return total

    # ----------------------------------------------------------------- checkpoints
    def committed(self, step: int, **fields) -> None:
        """A checkpoint of ``step`` committed (replacing any earlier record of that step)."""
        self.begin()
        self.run["last_seen"] = time.time()
        self.records[step] = {"step": step, **fields, "state": "kept"}

    def mark(self, step: int, state: str, **fields) -> None:
        """Checkpoint ``step`` was demoted or removed."""
        record = self.records.setdefault(step, {"step": step})
        record.update(state=state, **fields)

    def best(self, monitor: str, mode: str) -> float | None:
        """The best ``monitor`` value any recorded checkpoint was saved with."""
        values = [v for r in self.records.values() if (v := _value(r.get("metrics"), monitor))
                  is not None]
        if not values:
            return None
        return min(values) if mode == "min" else max(values)

    def ordered(self) -> list[dict]:
        """The records, by step."""
        return [self.records[s] for s in sorted(self.records)]

    def write(self) -> None:
        """Store the history (rank 0); a failure is a warning (it is informative)."""
        records = self.ordered()
        extra = len(records) - MAX_RECORDS
        if extra > 0:
            removed = [r["step"] for r in records if r.get("state") == "removed"][:extra]
            for s in removed:
                del self.records[s]
            records = self.ordered()
        doc = {"format": FORMAT, "records": records, "runs": self.runs}
        try:
            replace_file(self.storage, HISTORY_NAME,
                         json.dumps(doc, allow_nan=False).encode() + b"\n", "manager")
        except (OSError, CheckpointError, ValueError) as exc:
            warnings.warn(f"shardckpt: cannot update {self.storage.url(HISTORY_NAME)}: "
                          f"{type(exc).__name__}: {exc}", stacklevel=3)
