"""Save rules: small objects that say whether ``CheckpointManager.maybe_save`` saves at a call.

A rule reads one ``Tick`` (the call's step, epoch and metrics, the agreed clock flags and the
manager's facts) and answers with a reason (``"periodic"``, ``"epoch"``, ``"improvement"``...)
or None. Rules combine: ``a | b`` saves when either does, ``a & b`` when both do, evaluated left
to right and stopping at the first answer that decides, so ``EveryNEpochs(1) &
OnImprovement("val_loss")`` reads the metric only at epoch ends (Keras' ``save_best_only``).

Every answer is the same on every rank: rules that read a clock report local flags that the
manager agrees on among the ranks (the maximum, one call late, as the old ``every_n_seconds``
did); a metric is rank 0's value; everything else is a function of the call's arguments.
Preemption saves and ``CheckpointManager.save`` (a manual or final save) bypass the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..errors import MetricNotFoundError
from . import interval as interval_mod

__all__ = ["SaveRule", "Tick", "Facts", "EveryNSteps", "EveryNEpochs", "EveryNSeconds",
           "AtSteps", "Initial", "OnImprovement", "Continuous", "Auto", "AnyOf", "AllOf"]


@dataclass
class Facts:
    """What the manager knows that rules need; the same on every rank where it matters.

    Attributes:
        last_save: the manager clock when the last save started (or construction / restore).
        busy: a save of this rank is in flight.
        has_checkpoint: the root held a committed checkpoint at construction, or one was saved.
        best: ``best(monitor, mode)``: the best value any checkpoint of the root was saved with.
        costs: ``(stall_s, durable_s)`` of recent saves, oldest first.
        failures: unclean ends of earlier runs that this root recorded.
        observed_s: training time the root's earlier runs covered (for the failure rate).
        run_start: the manager clock when this run began.
        world_size: ranks of the job (the prior failure rate scales with it).
    """

    last_save: float = 0.0
    run_start: float = 0.0
    busy: bool = False
    has_checkpoint: bool = False
    best: Callable[[str, str], float | None] = lambda monitor, mode: None
    costs: list = field(default_factory=list)
    failures: int = 0
    observed_s: float = 0.0
    world_size: int = 1


def _alone(decide: Callable[[], int]) -> int:
    """One process: its own answer is the agreed one."""
    return decide()


@dataclass
class Tick:
    """One ``maybe_save`` call as the rules see it.

    Attributes:
        step, epoch: the call's arguments (``epoch``: epochs completed, int or float, or None).
        previous_epoch: the epoch of the previous call (or of the restored checkpoint).
        now: the manager's clock.
        facts: the manager's ``Facts``.
        flags: agreed clock flags by rule (``id(rule)`` -> tuple of ints).
        metrics: the call's metrics (this rank's).
        agree: ``agree(decide)``: rank 0's answer of ``decide()`` (an int) on every rank; an
            error rank 0 raises is raised on every rank.
    """

    step: int
    epoch: float | None
    previous_epoch: float | None
    now: float
    facts: Facts
    flags: dict = field(default_factory=dict)
    metrics: dict | None = None
    agree: Callable[[Callable[[], int]], int] = _alone

    def metric(self, name: str) -> float:
        """This rank's value of metric ``name`` as a float (NaN when it is no number).

        Raises:
            MetricNotFoundError: the call passed no such metric (naming those it passed).
        """
        if not self.metrics or name not in self.metrics:
            have = ", ".join(map(repr, self.metrics or {})) or "none"
            raise MetricNotFoundError(
                f"metric {name!r} is missing at step {self.step} (metrics passed: {have}); a "
                f"rule that checks it needs it at every call it checks: pass it, or combine "
                f"the rule with EveryNSteps/EveryNEpochs so it is checked where you evaluate")
        value = self.metrics[name]
        value = value.item() if hasattr(value, "item") else value
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan


class SaveRule:
    """Base of every save rule: ``check`` answers, ``|`` and ``&`` combine."""

    reason = "periodic"

    def check(self, tick: Tick) -> str | None:
        """The reason to save at ``tick``, or None (no save)."""
        raise NotImplementedError

    def clocked(self) -> list["SaveRule"]:
        """Rules in this tree that read a clock, in a fixed order (their flags are agreed)."""
        return [self] if self.flag_count else []

    def monitors(self) -> list[tuple[str, str]]:
        """``(monitor, mode)`` of the rules in this tree that read a metric."""
        return []

    flag_count = 0

    def local_flags(self, now: float, facts: Facts) -> tuple[int, ...]:
        """This rank's clock flags (for rules with ``flag_count``)."""
        return ()

    def __or__(self, other: "SaveRule") -> "SaveRule":
        return AnyOf(self, other)

    def __and__(self, other: "SaveRule") -> "SaveRule":
        return AllOf(self, other)


def _positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or not value > 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, not {value!r}")


class _Combined(SaveRule):
    """A combination of rules (flattened: ``a | b | c`` holds three)."""

    joiner = ""

    def __init__(self, *rules: SaveRule):
        flat = []
        for r in rules:
            if not isinstance(r, SaveRule):
                raise TypeError(f"a save rule combines only with save rules, not {r!r}")
            flat += r.rules if type(r) is type(self) else [r]
        self.rules = tuple(flat)

    def clocked(self) -> list[SaveRule]:
        return [leaf for r in self.rules for leaf in r.clocked()]

    def monitors(self) -> list[tuple[str, str]]:
        return [m for r in self.rules for m in r.monitors()]

    def __repr__(self) -> str:
        return "(" + f" {self.joiner} ".join(map(repr, self.rules)) + ")"


class AnyOf(_Combined):
    """Saves when any of its rules does (``a | b``); the reason is the first one's."""

    joiner = "|"

    def check(self, tick: Tick) -> str | None:
        for r in self.rules:
            if (why := r.check(tick)) is not None:
                return why
        return None


class AllOf(_Combined):
    """Saves when all of its rules do (``a & b``), checked left to right; reasons joined
    with ``+``."""

    joiner = "&"

    def check(self, tick: Tick) -> str | None:
        reasons = []
        for r in self.rules:
            why = r.check(tick)
            if why is None:
                return None
            reasons.append(why)
        return "+".join(dict.fromkeys(reasons))


class EveryNSteps(SaveRule):
    """Save when ``step % n == 0``.

    Args:
        n: the step interval (a positive int; ValueError otherwise).
    """

    def __init__(self, n: int):
        _positive("EveryNSteps(n)", n)
        self.n = n

    def check(self, tick: Tick) -> str | None:
        return "periodic" if tick.step % self.n == 0 else None

    def __repr__(self) -> str:
        return f"EveryNSteps({self.n})"


class EveryNEpochs(SaveRule):
    """Save when the completed epochs pass a multiple of ``n``.

    ``maybe_save(..., epoch=e)`` passes how many epochs are complete: an int (call with
    ``epoch + 1`` after an epoch's validation), or a float such as HF's ``state.epoch``. The
    rule fires at the first call whose ``floor(epoch / n)`` exceeds the previous call's, so a
    whole number reached again (the next epoch's first steps, a restart) does not fire twice.
    Calls without ``epoch`` never fire it.

    Args:
        n: the epoch interval (a positive int; ValueError otherwise).
    """

    reason = "epoch"

    def __init__(self, n: int = 1):
        _positive("EveryNEpochs(n)", n)
        self.n = n

    def check(self, tick: Tick) -> str | None:
        if tick.epoch is None:
            return None
        before = -1 if tick.previous_epoch is None else math.floor(tick.previous_epoch / self.n)
        now = math.floor(tick.epoch / self.n)
        if tick.previous_epoch is None:  # the first call: a boundary only if it is exactly one
            return "epoch" if tick.epoch > 0 and tick.epoch / self.n == now else None
        return "epoch" if now > before else None

    def __repr__(self) -> str:
        return f"EveryNEpochs({self.n})"


class EveryNSeconds(SaveRule):
    """Save when ``seconds`` have passed since the last save started (or since construction or
    restore), by the manager's clock; with several ranks, by the first rank whose clock says so
    (agreed one call late).

    Args:
        seconds: the interval (> 0; ValueError otherwise).
    """

    flag_count = 1

    def __init__(self, seconds: float):
        _positive("EveryNSeconds(seconds)", seconds, float)
        self.seconds = float(seconds)

    def local_flags(self, now: float, facts: Facts) -> tuple[int, ...]:
        return (int(now - facts.last_save >= self.seconds),)

    def check(self, tick: Tick) -> str | None:
        return "periodic" if tick.flags[id(self)][0] else None

    def __repr__(self) -> str:
        return f"EveryNSeconds({self.seconds:g})"


class AtSteps(SaveRule):
    """Save at exactly these steps (milestones; pair with ``KeepSteps`` to keep them).

    Args:
        steps: the steps (ints >= 0; ValueError otherwise).
    """

    reason = "milestone"

    def __init__(self, steps: Iterable[int]):
        self.steps = frozenset(int(s) for s in steps)
        if any(s < 0 for s in self.steps):
            raise ValueError(f"AtSteps: steps must be >= 0, not {sorted(self.steps)}")

    def check(self, tick: Tick) -> str | None:
        return "milestone" if tick.step in self.steps else None

    def __repr__(self) -> str:
        return f"AtSteps({sorted(self.steps)})"


class Initial(SaveRule):
    """Save at the first call when the root holds no committed checkpoint yet."""

    reason = "initial"

    def check(self, tick: Tick) -> str | None:
        return None if tick.facts.has_checkpoint else "initial"

    def __repr__(self) -> str:
        return "Initial()"


class OnImprovement(SaveRule):
    """Save when ``monitor`` improves on the best value saved in this root so far.

    Args:
        monitor: a key of ``maybe_save``'s ``metrics``.
        mode: ``"min"`` or ``"max"``: which direction is better.
        min_delta: the improvement must exceed this (Keras' ``min_delta``).

    The best value is read from the root (its history, else the checkpoints' metrics), so it
    survives restarts. A NaN never improves. A call this rule checks without the metric raises
    ``MetricNotFoundError``; combine it (``EveryNEpochs(1) & OnImprovement(...)``) so that it is
    checked only where you evaluate.
    """

    reason = "improvement"

    def __init__(self, monitor: str, mode: str = "min", min_delta: float = 0.0):
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"OnImprovement: monitor must be a metric name, not {monitor!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"OnImprovement: mode must be 'min' or 'max', not {mode!r}")
        if not min_delta >= 0:
            raise ValueError(f"OnImprovement: min_delta must be >= 0, not {min_delta!r}")
        self.monitor, self.mode, self.min_delta = monitor, mode, float(min_delta)

    def monitors(self) -> list[tuple[str, str]]:
        return [(self.monitor, self.mode)]

    def improves(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` by more than ``min_delta`` in the right direction."""
        if value is None or math.isnan(value):
            return False
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else \
            value > best + self.min_delta

    def check(self, tick: Tick) -> str | None:
        def decide() -> int:  # on rank 0 only, with its metric and its view of the best
            return int(self.improves(tick.metric(self.monitor),
                                     tick.facts.best(self.monitor, self.mode)))
        return "improvement" if tick.agree(decide) else None

    def __repr__(self) -> str:
        delta = f", min_delta={self.min_delta:g}" if self.min_delta else ""
        return f"OnImprovement({self.monitor!r}, mode={self.mode!r}{delta})"


class Continuous(SaveRule):
    """Save whenever no save is in flight on any rank, but not more often than every
    ``min_interval_s`` seconds (from one save's start to the next).

    Args:
        min_interval_s: the least time between two saves' starts (>= 0).
    """

    reason = "continuous"
    flag_count = 2

    def __init__(self, min_interval_s: float = 0.0):
        if not min_interval_s >= 0:
            raise ValueError(f"Continuous: min_interval_s must be >= 0, not {min_interval_s!r}")
        self.min_interval_s = float(min_interval_s)

    def local_flags(self, now: float, facts: Facts) -> tuple[int, ...]:
        return int(now - facts.last_save >= self.min_interval_s), int(facts.busy)

    def check(self, tick: Tick) -> str | None:
        elapsed, busy = tick.flags[id(self)]
        return "continuous" if elapsed and not busy else None

    def __repr__(self) -> str:
        return f"Continuous({self.min_interval_s:g})"


class Auto(SaveRule):
    """Save at the interval that minimises the expected lost time (Young/Daly).

    The interval balances the cost of a save (the measured stall of recent saves, and the
    durable time that the newest checkpoint lags behind) against the work lost per failure,
    with the failure rate estimated from the root's history (each restore after an unclean
    end counts) and a prior (``interval.prior_mtbf``) that the observations outweigh as they
    come. See ``shardckpt/manage/interval.py`` for the model.

    Args:
        min_interval_s, max_interval_s: bounds of the interval.
        mtbf_prior_s: the prior mean time between failures of the whole job (None: Meta's 1.8 h
            at 16,384 GPUs scaled to this job's world size).
        restart_s: time a restart costs besides the lost work (it shifts no interval, but
            enters the reported expected overhead).
    """

    reason = "auto"
    flag_count = 1

    def __init__(self, min_interval_s: float = 60.0, max_interval_s: float = 6 * 3600.0,
                 mtbf_prior_s: float | None = None, restart_s: float = 0.0):
        _positive("Auto(min_interval_s)", min_interval_s, float)
        if not max_interval_s >= min_interval_s:
            raise ValueError(f"Auto: max_interval_s ({max_interval_s!r}) must be >= "
                             f"min_interval_s ({min_interval_s!r})")
        self.min_interval_s, self.max_interval_s = float(min_interval_s), float(max_interval_s)
        self.mtbf_prior_s, self.restart_s = mtbf_prior_s, float(restart_s)

    def interval(self, facts: Facts, running_s: float = 0.0) -> float:
        """The interval (seconds) the rule saves at, from ``facts`` and the seconds this run
        has gone without a failure so far (``running_s``)."""
        stall, durable = interval_mod.typical_costs(facts.costs)
        mtbf = interval_mod.mtbf(facts.failures, facts.observed_s + running_s,
                                 facts.world_size, self.mtbf_prior_s)
        return interval_mod.best_interval(stall, durable, mtbf, self.min_interval_s,
                                          self.max_interval_s)

    def local_flags(self, now: float, facts: Facts) -> tuple[int, ...]:
        running = max(0.0, now - facts.run_start)
        return (int(now - facts.last_save >= self.interval(facts, running)),)

    def check(self, tick: Tick) -> str | None:
        return "auto" if tick.flags[id(self)][0] else None

    def __repr__(self) -> str:
        return f"Auto(min_interval_s={self.min_interval_s:g}, max_interval_s=" \
               f"{self.max_interval_s:g})"
