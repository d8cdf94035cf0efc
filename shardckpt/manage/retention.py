"""Which checkpoints a manager keeps: the newest few, the best few, and never the last one.

A pure function of the committed steps and their metrics, so that the rules can be tested
exhaustively apart from any file system.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping


def metric_value(metrics: Mapping | None, monitor: str | None) -> float | None:
    """The monitored metric of a checkpoint as a float, or None when absent or not a number."""
    if monitor is None or not metrics or monitor not in metrics:
        return None
    value = metrics[monitor]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def best_steps(steps: Iterable[int], metrics: Mapping[int, Mapping | None], monitor: str | None,
               mode: str, count: int | None = None) -> list[int]:
    """Steps carrying the monitored metric, best first (ties: the newer step first)."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    scored = [(v, s) for s in steps
              if (v := metric_value(metrics.get(s), monitor)) is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda vs: (sign * vs[0], -vs[1]))
    ranked = [s for _, s in scored]
    return ranked if count is None else ranked[:count]


def to_keep(steps: Iterable[int], metrics: Mapping[int, Mapping | None], *,
            keep_last: int | None, keep_best: int | None, monitor: str | None,
            mode: str = "min", protect: Iterable[int] = ()) -> set[int]:
    """The committed steps to keep.

    The union of the newest ``keep_last`` steps and the best ``keep_best`` by ``monitor``; with
    neither limit set, all of them. The newest step and the ``protect``-ed ones (in flight) are
    always kept. Steps without the metric count for ``keep_last`` only.
    """
    ordered = sorted(set(steps))
    if keep_last is None and keep_best is None:
        return set(ordered)
    keep = set(protect) & set(ordered)
    if ordered:
        keep.add(ordered[-1])
    if keep_last:
        keep.update(ordered[-keep_last:])
    if keep_best:
        keep.update(best_steps(ordered, metrics, monitor, mode, keep_best))
    return keep
