"""Does ``Auto`` pick an interval that pays for itself? Failure traces replayed against fixed
save intervals and against ``shardckpt.policy.Auto``.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/bench/policy_auto.py [--work-hours 500] [--seeds 20]
        [--stall 20] [--durable 90] [--restart 120] [--world 16384] [--measure-mib 0]

A job needs ``--work-hours`` of training. It saves every ``T`` seconds of training: each save
stalls the loop ``--stall`` seconds and becomes durable ``--durable`` seconds after it starts
(one save at a time: a save due while the previous is not durable waits for it). A failure
loses the work since the newest durable checkpoint plus ``--restart`` seconds. Traces:

- ``exponential``: failures of a Poisson process, mean 1.8 h apart (Meta, Llama 3 on 16k GPUs);
- ``preemption``: a synthetic spot-instance trace, preemptions in bursts by time of day (mean
  rate 1 per 3 h, five times as many in the busiest hours as in the calmest).

For each trace and seed, the lost time (wall time minus work) of fixed intervals from 1 minute
to 6 hours, and of ``Auto``, which starts from its prior (``--world`` ranks scale Meta's rate;
16384 makes the prior right for the exponential trace, 512 makes it 32x too optimistic) and
learns the failure rate from the failures it has seen, as it does from a root's history. The
best fixed interval is chosen in hindsight per trace (the mean over seeds). Target: ``Auto``
within 10 % of it. With ``--measure-mib`` the stall and durable time come from real async saves
of that many MiB through ``CheckpointManager`` on this machine instead.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile

import harness as bh

from shardckpt.manage.policy import Facts
from shardckpt.policy import Auto

HOUR = 3600.0


def exponential_trace(rng: random.Random, horizon: float, mean: float = 1.8 * HOUR) -> list:
    """Failure times (seconds of wall time) of a Poisson process."""
    out, t = [], 0.0
    while t < horizon:
        t += rng.expovariate(1.0 / mean)
        out.append(t)
    return out


def preemption_trace(rng: random.Random, horizon: float, mean: float = 3 * HOUR) -> list:
    """Preemptions whose rate follows the time of day (thinning of a Poisson process)."""
    base = 1.0 / (3 * mean)  # rate(t) = base * (1 + 4 * busy(t)): 3 * base on average
    peak = 5 * base
    out, t = [], 0.0
    while t < horizon:
        t += rng.expovariate(peak)
        busy = 0.5 * (1 + math.sin(2 * math.pi * t / (24 * HOUR)))
        if rng.random() < base * (1 + 4 * busy) / peak:
            out.append(t)
    return out


class Fixed:
    def __init__(self, seconds: float):
        self.seconds, self.name = seconds, f"every {seconds / 60:g} min"

    def interval(self, failures: int, wall: float, costs) -> float:
        return self.seconds


class Learning:
    """``Auto`` as the manager runs it: its facts are the failures and time seen so far."""

    def __init__(self, world: int):
        self.rule, self.world, self.name = Auto(min_interval_s=60, max_interval_s=6 * HOUR), \
            world, "Auto"

    def interval(self, failures: int, wall: float, costs) -> float:
        return self.rule.interval(Facts(costs=list(costs), failures=failures, observed_s=wall,
                                        world_size=self.world))


def simulate(trace: list, work: float, policy, stall: float, durable: float,
             restart: float) -> float:
    """Lost seconds (wall time minus work) of one run of ``work`` seconds under ``trace``."""
    wall = done = safe = last_save = 0.0
    pending = None  # (progress saved, wall time durable)
    failures, nxt = 0, 0
    costs = [(stall, durable)]

    def fail(at: float) -> None:
        nonlocal wall, done, safe, last_save, pending, failures, nxt
        if pending and pending[1] <= at:
            safe = pending[0]
        wall, done, last_save, pending = at + restart, safe, safe, None
        failures, nxt = failures + 1, nxt + 1

    while done < work:
        due = trace[nxt] if nxt < len(trace) else math.inf
        target = min(last_save + policy.interval(failures, wall, costs), work)
        if wall + (target - done) >= due:
            fail(due)
            continue
        wall, done = wall + (target - done), target
        if pending and pending[1] <= wall:
            safe, pending = pending[0], None
        if done >= work:
            break
        start = max(wall, pending[1]) if pending else wall  # wait for the previous save
        if start + stall >= due:
            fail(due)
            continue
        if pending:
            safe = pending[0]
        wall, pending, last_save = start + stall, (done, start + durable), done
    return wall - work, failures


def measure(mib: int) -> tuple[float, float]:
    """Median stall and durable seconds of real async saves of ``mib`` MiB by the manager."""
    import time
    import torch
    import shardckpt
    state = {"model": {"w": torch.randn(mib << 18)}}
    stalls, durables = [], []
    with tempfile.TemporaryDirectory(dir=bh.REPO, prefix=".bench-auto-") as root:
        with shardckpt.CheckpointManager(root, handle_preemption=False, keep_last=1) as mgr:
            for step in range(1, 6):
                t0 = time.perf_counter()
                mgr.save(step, state)
                stalls.append(time.perf_counter() - t0)
                mgr.wait()
                durables.append(time.perf_counter() - t0)
    return statistics.median(stalls), statistics.median(durables)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-hours", type=float, default=500.0)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--stall", type=float, default=20.0)
    p.add_argument("--durable", type=float, default=90.0)
    p.add_argument("--restart", type=float, default=120.0)
    p.add_argument("--world", type=int, nargs="+", default=[16384, 512])
    p.add_argument("--measure-mib", type=int, default=0)
    args = p.parse_args()
    stall, durable = args.stall, args.durable
    if args.measure_mib:
        stall, durable = measure(args.measure_mib)
        bh.log(f"measured: stall {stall:.3f} s, durable {durable:.3f} s")
    work = args.work_hours * HOUR
    fixed = [Fixed(60 * m) for m in (1, 2, 3, 5, 7, 10, 15, 20, 25, 30, 40, 50, 60, 90, 120,
                                     180, 240, 360)]
    print(bh.header("policy_auto", f"stall {stall:g} s", f"durable {durable:g} s",
                    f"restart {args.restart:g} s", f"{args.work_hours:g} h of work",
                    f"{args.seeds} seeds"))
    ok = True
    for trace_name, make in (("exponential", exponential_trace), ("preemption", preemption_trace)):
        traces = [make(random.Random(seed), 4 * work) for seed in range(args.seeds)]
        lost = {}
        for policy in fixed + [Learning(w) for w in args.world]:
            name = policy.name + (f" (prior: {policy.world} ranks)" if isinstance(
                policy, Learning) else "")
            runs = [simulate(t, work, policy, stall, durable, args.restart) for t in traces]
            lost[name] = statistics.mean(r[0] for r in runs)
            failures = statistics.mean(r[1] for r in runs)
        best_name = min((n for n in lost if not n.startswith("Auto")), key=lost.get)
        rows = [[n, f"{v / HOUR:.2f}", f"{100 * v / work:.2f}",
                 f"{v / lost[best_name]:.3f}"] for n, v in lost.items()]
        print(f"\ntrace: {trace_name} (about {failures:.0f} failures per run)")
        print(bh.table(["policy", "lost h", "lost % of work", "vs best fixed"], rows))
        for n, v in lost.items():
            if n.startswith("Auto"):
                good = v <= 1.10 * lost[best_name]
                ok &= good
                print(f"{n}: {v / lost[best_name]:.3f} x the best fixed interval "
                      f"({best_name}): {'PASS' if good else 'FAIL'} (target <= 1.10)")
    print("\nall targets met" if ok else "\nsome targets missed")


if __name__ == "__main__":
    main()
