"""The cost model behind ``Auto``: how often to save so that saving and failing cost least.

Saving every ``T`` seconds of training costs the loop the save's stall ``C`` per save, plus the
wait for the previous save when ``T`` is shorter than its durable time ``D`` (one save runs at a
time). A failure loses the work since the newest durable checkpoint: on average ``T / 2 + D``,
plus the restart ``R``. With failures at rate ``1 / M`` the overhead per second of training is

    overhead(T) = (C + max(0, D - T)) / T + (T / 2 + D + R) / M

For ``T >= D`` it is smallest at ``T = sqrt(2 C M)`` (Young 1974; Daly 2006 adds higher-order
terms that matter only when ``T`` nears ``M``); below ``D`` it only grows as ``T`` shrinks, so the
best interval is ``max(sqrt(2 C M), D)``, clamped to the caller's bounds.

The failure rate comes from the root's history: ``M = (observed + P) / (failures + 1)``, one
pseudo-failure at the prior ``P`` that the job's own failures outweigh as they come. The prior
defaults to Meta's measurement (Llama 3: a failure every 1.8 h on 16,384 GPUs), taken as a
per-GPU rate and scaled to the job's ranks.
"""

from __future__ import annotations

import math
import statistics

META_MTBF_S = 1.8 * 3600.0  # Llama 3 training: mean time between interruptions at 16k GPUs
META_GPUS = 16384
RECENT = 8  # saves whose costs make the "typical" save


def prior_mtbf(world_size: int) -> float:
    """The prior mean time between failures (seconds) of a job of ``world_size`` ranks."""
    return META_MTBF_S * META_GPUS / max(1, int(world_size))


def mtbf(failures: int, observed_s: float, world_size: int = 1,
         prior_s: float | None = None) -> float:
    """The estimated mean time between failures: observed time plus one prior interval,
    over observed failures plus one."""
    prior = prior_mtbf(world_size) if prior_s is None else float(prior_s)
    return (max(0.0, observed_s) + prior) / (max(0, failures) + 1)


def typical_costs(costs) -> tuple[float, float]:
    """``(stall, durable)`` seconds of a typical recent save: medians of the newest few;
    ``(0, 0)`` before any save (the first save is then due at the minimum interval)."""
    recent = list(costs)[-RECENT:]
    if not recent:
        return 0.0, 0.0
    return (statistics.median(max(0.0, c[0]) for c in recent),
            statistics.median(max(0.0, c[1]) for c in recent))


def overhead(interval: float, stall: float, durable: float, mtbf_s: float,
             restart: float = 0.0) -> float:
    """Expected seconds lost per second of training when saving every ``interval`` seconds."""
    t = max(interval, 1e-9)
    return (stall + max(0.0, durable - t)) / t + (t / 2 + durable + restart) / mtbf_s


def best_interval(stall: float, durable: float, mtbf_s: float, lo: float, hi: float) -> float:
    """The interval in ``[lo, hi]`` with the least ``overhead`` (see the module docstring)."""
    best = max(math.sqrt(2.0 * max(stall, 0.0) * mtbf_s), durable)
    return min(max(best, lo), hi)
