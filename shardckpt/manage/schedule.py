"""The manager's use of its policies: rules built from the keywords, one decision per call with
its flags agreed among ranks, and the retention pass (remove, demote) after each commit.

``CheckpointManager`` holds one ``Schedule``; it owns the save rule's facts (when the last save
started, what saves cost, the best values, the failure history) and the keep and demote rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import MetricNotFoundError
from .history import History, json_epoch, json_metrics
from .keep import KeepBest, KeepContext, KeepFull, KeepLast, KeepRule, kept
from .policy import EveryNSeconds, EveryNSteps, Facts, SaveRule, Tick

META_KEY = "shardckpt.manager"
CODE_MISSING = -1  # rank 0's metric was missing: every rank raises


@dataclass
class Flight:
    """A save the manager started: what its history record needs once it commits."""

    step: int
    metrics: dict | None
    epoch: float | int | None
    reason: str
    started: float  # the manager's clock at the start
    handle: Any = None  # the async save's handle (None: it ran synchronously)
    stall: float = 0.0  # seconds the call blocked the training loop


class Restored(int):
    """What ``restore`` returns: the step loaded (an ``int``, so code that expects the step
    works unchanged), with ``epoch`` and ``metrics`` of that checkpoint."""

    epoch: float | int | None
    metrics: dict | None

    def __new__(cls, step: int, epoch=None, metrics=None) -> "Restored":
        out = super().__new__(cls, step)
        out.epoch, out.metrics = epoch, metrics
        return out


def save_rule(save: SaveRule | None, every_n_steps, every_n_seconds,
              names: str = "save= or every_n_steps/every_n_seconds") -> SaveRule | None:
    """``save``, or the rule the old keywords stand for (``|``-ed); not both (``names`` says
    which keywords, for the error)."""
    legacy = [r for r in (EveryNSteps(every_n_steps) if every_n_steps else None,
                          EveryNSeconds(every_n_seconds) if every_n_seconds else None) if r]
    if save is not None and legacy:
        raise ValueError(f"pass {names}, not both")
    if save is not None and not isinstance(save, SaveRule):
        raise TypeError(f"{names.split()[0]} takes a save rule (shardckpt.policy), not "
                        f"{save!r}")
    if save is None and legacy:
        save = legacy[0] if len(legacy) == 1 else legacy[0] | legacy[1]
    return save


def keep_rule(keep: KeepRule | None, keep_last, keep_best, monitor, mode) -> KeepRule | None:
    """``keep``, or the rule ``keep_last`` / ``keep_best`` stand for (``|``-ed); not both."""
    legacy = [r for r in (KeepLast(keep_last) if keep_last else None,
                          KeepBest(keep_best, monitor, mode) if keep_best else None) if r]
    if keep is not None and legacy:
        raise ValueError("pass keep= or keep_last/keep_best, not both")
    if keep is not None and not isinstance(keep, KeepRule):
        raise TypeError(f"keep= takes a keep rule (shardckpt.policy), not {keep!r}")
    if keep is None and legacy:
        keep = legacy[0] if len(legacy) == 1 else legacy[0] | legacy[1]
    return keep


def monitor_of(monitor, mode, *rules) -> tuple[str | None, str]:
    """The manager's ``(monitor, mode)``: as given, else the first rule's that names one (an
    ``OnImprovement``, a ``KeepBest``, a ``KeepFull(best=...)``)."""
    if monitor is not None:
        return monitor, mode
    for rule in rules:
        for name, how in (rule.monitors() if rule is not None else []):
            if name is not None:
                return name, how or mode
    return None, mode


class Schedule:
    """Decides at each ``maybe_save`` call and after each commit.

    Args:
        save, keep, demote: the rules (None: no periodic saves / keep all / demote none).
        monitor, mode: the manager's (for keep rules that name none, and for ``ls``).
        ranks: the manager's rank group (``max``, ``rank0_list``, ``rank``, ``dist``).
        history: the root's history.
        clock: the manager's clock.
        completions: where the costs of saves that finish in the background come from (the
            local tier's ``completions``), taken before each decision; None: none do.
    """

    def __init__(self, save, keep, demote, monitor, mode, ranks, history: History,
                 clock: Callable[[], float], completions: Callable[[], list] | None = None):
        if demote is not None and not isinstance(demote, KeepFull):
            raise TypeError(f"demote= takes KeepFull(...), not {demote!r}")
        self.save, self.keep, self.demote = save, keep, demote
        self.monitor, self.mode = monitor, mode
        self.ranks, self.history, self.clock = ranks, history, clock
        self.completions = completions
        self.clocked = save.clocked() if save is not None else []
        world = ranks.dist.get_world_size() if ranks.dist else 1
        now = clock()
        self.facts = Facts(last_save=now, run_start=now, best=self.best, world_size=world,
                           failures=history.failures(),
                           observed_s=history.observed_seconds())
        self.previous_epoch: float | None = None
        self.in_flight: dict[int, dict | None] = {}  # metrics of saves not yet in the history

    def best(self, monitor: str, mode: str) -> float | None:
        """The best ``monitor`` value saved in this root, the save in flight included."""
        values = [v for v in [self.history.best(monitor, mode)] + [
            _number((m or {}).get(monitor)) for m in self.in_flight.values()] if v is not None]
        if not values:
            return None
        return min(values) if mode == "min" else max(values)

    # ----------------------------------------------------------------- save decisions
    def flag_count(self) -> int:
        return sum(leaf.flag_count for leaf in self.clocked)

    def local_flags(self) -> list[int]:
        """This rank's clock flags, in the order of ``clocked`` (after taking the costs of the
        saves that completed since the last call)."""
        for done in self.completions() if self.completions is not None else []:
            self.cost(done["stall_s"], done["seconds"])
        now = self.clock()
        return [f for leaf in self.clocked for f in leaf.local_flags(now, self.facts)]

    def _agree(self, decide: Callable[[], int]) -> int:
        """Rank 0's ``decide()`` on every rank (its MetricNotFoundError raised on all)."""
        if not self.ranks.dist:
            return decide()
        code, error = 0, None
        if self.ranks.rank == 0:
            try:
                code = decide()
            except MetricNotFoundError as exc:
                code, error = CODE_MISSING, exc
        (code,) = self.ranks.rank0_list([code])
        if code == CODE_MISSING:
            raise error or MetricNotFoundError("a metric that the save rule checks is missing "
                                               "from rank 0's metrics (see rank 0's error)")
        return code

    def check(self, step: int, epoch, metrics, flags: list[int], skip: bool = False
              ) -> str | None:
        """The reason to save at this call (None: no save); ``flags`` as ``local_flags``
        returned them, agreed among the ranks. ``skip``: only note the call's epoch (the step
        was saved already)."""
        if self.save is None or skip:
            self._saw(epoch)
            return None
        by_leaf, at = {}, 0
        for leaf in self.clocked:
            by_leaf[id(leaf)] = tuple(flags[at:at + leaf.flag_count])
            at += leaf.flag_count
        tick = Tick(step, epoch, self.previous_epoch, self.clock(), self.facts, by_leaf,
                    metrics, self._agree)
        try:
            return self.save.check(tick)
        finally:
            self._saw(epoch)

    def _saw(self, epoch) -> None:
        if epoch is not None:
            self.previous_epoch = epoch

    def started(self, step: int, metrics: dict | None) -> None:
        """A save started now (any reason): timers restart from here, and its metrics count
        for the best value until it commits or fails (``settled``)."""
        self.facts.last_save = self.clock()
        self.facts.has_checkpoint = True
        self.in_flight[step] = metrics

    def settled(self, step: int) -> None:
        """The save of ``step`` committed (its record holds the metrics now) or failed."""
        self.in_flight.pop(step, None)

    def restored(self, epoch) -> None:
        """A checkpoint was restored: its epoch is the previous one; a failure may be counted."""
        self.facts.last_save = self.clock()
        self.previous_epoch = epoch
        if self.history.restored():
            self.facts.failures = self.history.failures()
        self.facts.observed_s = self.history.observed_seconds()

    def save_local(self, tier, step: int, state_dict, metrics, epoch, flags: list[int]) -> None:
        """The local tier's save (``tier.save_async``) when this schedule's rule (the manager's
        ``local_save``) says so. The costs ``Auto`` weighs for that tier are those of its
        committed saves (``completions``: stall, and time until committed with replicas)."""
        if self.check(step, epoch, metrics, flags) is None:
            return
        meta = {META_KEY: {"step": step, "epoch": json_epoch(epoch), "reason": "local",
                           "metrics": json_metrics(metrics), "unix_time": time.time()}}
        if tier.save_async(step, state_dict, meta):
            self.started(step, None)
            self.settled(step)

    def ended(self, clean: bool, write: bool) -> None:
        """The manager closes: the run's end goes into the history (rank 0 ``write``s it)
        when this run recorded anything there."""
        if self.history.run is not None:
            self.history.end(clean)
            if write:
                self.history.write()

    def cost(self, stall_s: float, durable_s: float) -> None:
        """A save's measured stall and time until durable (for ``Auto``)."""
        self.facts.costs.append((float(stall_s), float(durable_s)))
        del self.facts.costs[:-32]

    # ----------------------------------------------------------------- retention
    def context(self, steps: list[int], metrics: dict) -> KeepContext:
        return KeepContext(tuple(sorted(steps)), metrics, self.monitor, self.mode)

    def to_keep(self, ctx: KeepContext, protect=()) -> set[int]:
        """The committed steps retention keeps."""
        return kept(self.keep, ctx, protect)

    def to_demote(self, ctx: KeepContext, keep: set[int], demoted: set[int]) -> list[int]:
        """Kept steps that lose their full state now (not yet demoted, not kept full)."""
        if self.demote is None:
            return []
        full = self.demote.full(KeepContext(tuple(sorted(keep)), ctx.metrics, ctx.monitor,
                                            ctx.mode))
        return sorted(s for s in keep if s not in full and s not in demoted)



def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)
