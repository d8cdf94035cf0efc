"""Keep rules: which committed checkpoints retention keeps, and which of those stay full.

A keep rule maps the committed steps (and their metrics) to the set it keeps; ``a | b`` keeps
what either keeps, ``a & b`` what both keep. The manager always keeps the newest checkpoint and
the one in flight besides. ``KeepFull`` then picks, among the kept ones, those that keep their
whole state; the manager demotes the others to weights only (format/demote.py).

Pure functions of steps and metrics, so the rules are tested apart from any file system.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from .retention import best_steps

__all__ = ["KeepRule", "KeepContext", "KeepLast", "KeepBest", "KeepEvery", "KeepSteps",
           "KeepFull", "KeepAny", "KeepAll"]


@dataclass(frozen=True)
class KeepContext:
    """What a keep rule decides from.

    Attributes:
        steps: the committed steps, ascending.
        metrics: each step's metrics (None without).
        monitor, mode: the manager's, for rules that name none.
    """

    steps: tuple[int, ...]
    metrics: Mapping[int, Mapping | None]
    monitor: str | None = None
    mode: str = "min"


class KeepRule:
    """Base of every keep rule: ``select`` decides, ``|`` and ``&`` combine."""

    def select(self, ctx: KeepContext) -> set[int]:
        """The steps of ``ctx.steps`` this rule keeps."""
        raise NotImplementedError

    def monitors(self) -> list[tuple[str | None, str | None]]:
        """``(monitor, mode)`` of the rules in this tree that rank by a metric."""
        return []

    def __or__(self, other: "KeepRule") -> "KeepRule":
        return KeepAny(self, other)

    def __and__(self, other: "KeepRule") -> "KeepRule":
        return KeepAll(self, other)


def _count(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, not {n!r}")
    return n


class _Combined(KeepRule):
    joiner = ""

    def __init__(self, *rules: KeepRule):
        flat = []
        for r in rules:
            if not isinstance(r, KeepRule):
                raise TypeError(f"a keep rule combines only with keep rules, not {r!r}")
            flat += r.rules if type(r) is type(self) else [r]
        self.rules = tuple(flat)

    def monitors(self):
        return [m for r in self.rules for m in r.monitors()]

    def __repr__(self) -> str:
        return "(" + f" {self.joiner} ".join(map(repr, self.rules)) + ")"


class KeepAny(_Combined):
    """Keeps what any of its rules keeps (``a | b``)."""

    joiner = "|"

    def select(self, ctx: KeepContext) -> set[int]:
        return set().union(*(r.select(ctx) for r in self.rules))


class KeepAll(_Combined):
    """Keeps what all of its rules keep (``a & b``)."""

    joiner = "&"

    def select(self, ctx: KeepContext) -> set[int]:
        return set.intersection(*(r.select(ctx) for r in self.rules))


class KeepLast(KeepRule):
    """Keep the newest ``n`` checkpoints.

    Args:
        n: how many (a positive int; ValueError otherwise).
    """

    def __init__(self, n: int):
        self.n = _count("KeepLast(n)", n)

    def select(self, ctx: KeepContext) -> set[int]:
        return set(ctx.steps[-self.n:])

    def __repr__(self) -> str:
        return f"KeepLast({self.n})"


class KeepBest(KeepRule):
    """Keep the best ``n`` checkpoints by ``monitor`` (checkpoints without it never count).

    Args:
        n: how many.
        monitor: the metric (None: the manager's ``monitor``, or its ``OnImprovement``'s).
        mode: ``"min"`` or ``"max"`` (None: the manager's).
    """

    def __init__(self, n: int, monitor: str | None = None, mode: str | None = None):
        self.n = _count("KeepBest(n)", n)
        if mode not in (None, "min", "max"):
            raise ValueError(f"KeepBest: mode must be 'min' or 'max', not {mode!r}")
        self.monitor, self.mode = monitor, mode

    def monitors(self):
        return [(self.monitor, self.mode)]

    def select(self, ctx: KeepContext) -> set[int]:
        monitor = self.monitor or ctx.monitor
        if monitor is None:
            raise ValueError("KeepBest needs a monitor: KeepBest(n, monitor=...) or the "
                             "manager's monitor=")
        return set(best_steps(ctx.steps, ctx.metrics, monitor, self.mode or ctx.mode, self.n))

    def __repr__(self) -> str:
        return f"KeepBest({self.n}, monitor={self.monitor!r}, mode={self.mode!r})"


class KeepEvery(KeepRule):
    """Keep every checkpoint whose step is a multiple of ``n_steps`` (milestones, forever).

    Args:
        n_steps: the milestone interval (a positive int; ValueError otherwise).
    """

    def __init__(self, n_steps: int):
        self.n_steps = _count("KeepEvery(n_steps)", n_steps)

    def select(self, ctx: KeepContext) -> set[int]:
        return {s for s in ctx.steps if s % self.n_steps == 0}

    def __repr__(self) -> str:
        return f"KeepEvery({self.n_steps})"


class KeepSteps(KeepRule):
    """Keep the checkpoints of exactly these steps.

    Args:
        steps: the steps to keep (ints).
    """

    def __init__(self, steps: Iterable[int]):
        self.steps = frozenset(int(s) for s in steps)

    def select(self, ctx: KeepContext) -> set[int]:
        return set(self.steps & set(ctx.steps))

    def __repr__(self) -> str:
        return f"KeepSteps({sorted(self.steps)})"


class KeepFull:
    """Which kept checkpoints keep their whole state; the manager demotes the other kept ones
    to weights only (the ``key`` subtree; optimizer, RNG and data position go).

    Args:
        last: the newest ``last`` stay full (at least 1: ``restore`` resumes from one).
        best: the best ``best`` by ``monitor`` stay full too.
        monitor, mode: as ``KeepBest`` (None: the manager's).
        key: the state's top-level key that holds the weights.
    """

    def __init__(self, last: int = 1, best: int = 0, monitor: str | None = None,
                 mode: str | None = None, key: str = "model"):
        self.last = _count("KeepFull(last)", last)
        if isinstance(best, bool) or not isinstance(best, int) or best < 0:
            raise ValueError(f"KeepFull(best) must be an int >= 0, not {best!r}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"KeepFull(key) must be a top-level key of the state, not {key!r}")
        self.best, self.monitor, self.mode, self.key = best, monitor, mode, key

    def monitors(self):
        return [(self.monitor, self.mode)] if self.best else []

    def full(self, ctx: KeepContext) -> set[int]:
        """The steps of ``ctx.steps`` that stay full."""
        keep = set(ctx.steps[-self.last:])
        if self.best:
            keep |= KeepBest(self.best, self.monitor, self.mode).select(ctx)
        return keep

    def __repr__(self) -> str:
        return f"KeepFull(last={self.last}, best={self.best}, key={self.key!r})"


def kept(rule: KeepRule | None, ctx: KeepContext, protect: Iterable[int] = ()) -> set[int]:
    """The steps retention keeps: ``rule``'s choice (all without a rule), the newest, and the
    ``protect``-ed ones (in flight)."""
    if rule is None:
        return set(ctx.steps)
    keep = rule.select(ctx) | (set(protect) & set(ctx.steps))
    if ctx.steps:
        keep.add(ctx.steps[-1])
    return keep
