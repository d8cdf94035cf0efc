"""How long ``shardckpt.async_save`` stalls the training, and how much host memory it adds.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/bench/async_save.py [--size-gib 1.0] [--reps 5]
        [--dir DIR] [--json OUT] [--quick] [--guarded]

``--guarded`` runs guarded.py instead: a model + AdamW state saved guarded (the optimizer
copies in the background), eager, and by DCP, against a warm copy.

State: an LLM-shaped state of ``--size-gib`` (states.llm_state: half bf16 weights, half a
ZeRO-1 rank's fp32 optimizer share). ``--quick`` is a smoke test: 0.1 GiB, 1 repetition.

Stall: the time from the call until the caller may change the state again. Contenders run
round-robin within each repetition (the starting one rotates) and the report shows medians:
  - two memcpy limits: ``clone()`` of every tensor (the issue's limit; it lands in freshly
    allocated memory) and ``copy_()`` into buffers allocated once (memory already faulted in,
    as shardckpt's reused staging arena is: the tighter limit, shown for information);
  - shardckpt ``async_save`` with its default budget (the call's wall time; ``h.stall_seconds``
    is kept too; the commit is waited for off the stall clock, but timed);
  - DCP ``async_save`` with a ``DefaultStager`` that stages asynchronously without pinned or
    shared memory (the accelerator-free options; DCP's default stager options need an
    accelerator). The call returns at once and stages in a thread, so its stall runs until
    ``staging_completion``: only then may the caller change the tensors. The stager is kept
    across saves, as a training loop keeps it, so its cached copies are reused;
  - DCP ``async_save`` with no stager given (it then stages synchronously into new memory), for
    information.
Every contender saves once at full size before the repetitions (reported as "first save"), so
that the medians show the steady state of a training loop and not first-call allocation.

Peak extra RSS: each contender runs in a fresh subprocess, so peaks do not mix. The child builds
the state, warms up on a small copy, resets the kernel's RSS high-water mark, runs one save to
its commit and reports how far the peak rose. shardckpt's native encode pool (``pool_bytes``)
comes on top of the staging budget by design, so the budgeted run is checked against the budget
alone (the issue's target) and against budget + pool.

Progress goes to stderr; the report to stdout; ``--json`` keeps every measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as bh  # noqa: E402 - needs the path above
import guarded  # noqa: E402
import states  # noqa: E402
from harness import CORES, MIB, check, first_error, med, ratio, remove, spread  # noqa: E402

# DCP warns about the missing process group and the experimental API; one process is the point.
warnings.filterwarnings("ignore")

import shardckpt  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint.staging import DefaultStager  # noqa: E402
from shardckpt.save.write import WriteOptions  # noqa: E402

BUDGET = 256 * MIB          # the staging budget of the budgeted memory run
POOL = 32 * MIB             # its native encode pool, which comes on top of the budget
RSS_SLACK = 1.10            # the issue allows the budget + 10%
CLONE = "memcpy (clone)"
COPY = "memcpy into reused buffers"
SHARDCKPT = "shardckpt async_save"
DCP_STAGED = "DCP async_save (async stager)"
DCP_DEFAULT = "DCP async_save (no stager)"
CPU_STAGING = bh.dcp_cpu_staging()
# What a contender allocates is freed only at its next turn, off the clock: this VM hands freed
# memory back to the host and first touch of such pages is slow (see save.py), so a
# 1 GiB free would otherwise be charged to whoever runs next.
HELD: dict[str, object] = {}


@dataclass
class Context:
    """What contenders keep between repetitions, as a training loop keeps it between saves."""

    stager: DefaultStager | None = None
    buffers: list | None = None
    first: dict = field(default_factory=dict)


# ---- stall contenders: each returns {"stall": s, ...} and leaves its checkpoint committed ------

def stall_clone(state, path, ctx):
    tensors = bh.flat_tensors(state)[0]
    t0 = time.perf_counter()
    copies = {k: v.clone() for k, v in tensors.items()}
    stall = time.perf_counter() - t0
    HELD[CLONE] = copies
    return {"stall": stall}


def stall_copy(state, path, ctx):
    tensors = bh.tensors_of(state)
    if ctx.buffers is None:  # the first save allocates, like a staging arena's first use
        ctx.buffers = [torch.empty_like(t) for t in tensors]
    t0 = time.perf_counter()
    for dst, src in zip(ctx.buffers, tensors):
        dst.copy_(src)
    return {"stall": time.perf_counter() - t0}


def stall_shardckpt(state, path, ctx):
    t0 = time.perf_counter()
    handle = shardckpt.async_save(state, path)
    stall = time.perf_counter() - t0
    handle.result()
    return {"stall": stall, "stall_seconds": handle.stall_seconds, "call": stall,
            "commit": time.perf_counter() - t0}


def stall_dcp_staged(state, path, ctx):
    if ctx.stager is None:
        ctx.stager = DefaultStager(CPU_STAGING)
    t0 = time.perf_counter()
    response = dcp.async_save(state, storage_writer=FileSystemWriter(path),
                              async_stager=ctx.stager, no_dist=True)
    call = time.perf_counter() - t0
    response.staging_completion.result()  # only now may the caller change the tensors
    stall = time.perf_counter() - t0
    response.upload_completion.result()
    return {"stall": stall, "call": call, "commit": time.perf_counter() - t0}


def stall_dcp_default(state, path, ctx):
    t0 = time.perf_counter()
    future = dcp.async_save(state, storage_writer=FileSystemWriter(path), no_dist=True)
    stall = time.perf_counter() - t0
    future.result()
    return {"stall": stall, "call": stall, "commit": time.perf_counter() - t0}


@dataclass(frozen=True)
class Contender:
    name: str
    fn: Callable


CONTENDERS = [Contender(CLONE, stall_clone), Contender(COPY, stall_copy),
              Contender(SHARDCKPT, stall_shardckpt), Contender(DCP_STAGED, stall_dcp_staged),
              Contender(DCP_DEFAULT, stall_dcp_default)]


# ---- the stall phase ---------------------------------------------------------------------------

def measure_stall(contender: Contender, state, path: str, ctx: Context) -> dict:
    """One save; an exception becomes an error record rather than ending the run."""
    HELD.pop(contender.name, None)
    os.sync()  # the previous contender's writes must not be flushed on this one's clock
    try:
        return contender.fn(state, path, ctx)
    except Exception as exc:  # noqa: BLE001 - one failing contender must not abort the run
        return bh.error_record(exc)
    finally:
        remove(path)


def small_copy(state) -> dict:
    """Copies of a few tensors (new storages, so DCP's stager cache keeps nothing of the state)."""
    return {k: v.clone() for k, v in list(bh.flat_tensors(state)[0].items())[-4:]}


def warm_up(state, workdir: str, ctx: Context) -> None:
    """Imports and thread pools on a small state, then one full-size save each (the first save).

    The full-size round lets arenas and caches grow once, as they do on a training job's first
    checkpoint; it is reported apart from the medians.
    """
    small, scratch = small_copy(state), Context()
    for c in CONTENDERS:
        measure_stall(c, small, os.path.join(workdir, "warmup"), scratch)
    if scratch.stager is not None:
        scratch.stager.close()
    del small, scratch
    for c in CONTENDERS:
        record = measure_stall(c, state, os.path.join(workdir, "first"), ctx)
        ctx.first[c.name] = record
        bh.log(f"first save {c.name}: {describe(record)}")


def describe(record: dict) -> str:
    return record.get("error") or f"stall {record['stall']:.3f} s"


def run_stalls(state, workdir: str, reps: int) -> dict:
    """``{"records": {contender: [records]}, "first": {contender: record}}``."""
    ctx = Context()
    warm_up(state, workdir, ctx)
    records = bh.round_robin(CONTENDERS, reps, lambda c, rep: measure_stall(
        c, state, os.path.join(workdir, f"r{rep}"), ctx), describe)
    HELD.clear()
    if ctx.stager is not None:
        ctx.stager.close()
    return {"records": records, "first": ctx.first}


# ---- peak extra RSS, one fresh process per contender ----------------------------------------

RSS_RUNS = {  # name: (staging_budget_bytes, pool_bytes); None = the library's default
    f"shardckpt budget {BUDGET // MIB} MiB": (BUDGET, POOL),
    "shardckpt default budget": (None, None),
    DCP_STAGED: (None, None),
}


def rss_save(name: str, state, path: str, stager) -> None:
    """One save of ``state`` by ``name``, waited for until committed."""
    if name.startswith("DCP"):
        dcp.async_save(state, storage_writer=FileSystemWriter(path), async_stager=stager,
                       no_dist=True).upload_completion.result()
        return
    budget, pool = RSS_RUNS[name]
    tuning = {} if pool is None else {"pool_bytes": pool}
    shardckpt.async_save(state, path, staging_budget_bytes=budget, **tuning).result()


def rss_child(name: str, size_gib: float, workdir: str) -> dict:
    """Runs in the subprocess: how far one save raises the peak RSS."""
    torch.set_num_threads(CORES)
    state, _ = states.llm_state(size_gib)
    stager = DefaultStager(CPU_STAGING) if name.startswith("DCP") else None
    path = os.path.join(workdir, f"rss-{bh.slug(name)}")
    rss_save(name, small_copy(state), path + "-warmup", stager)  # imports, pools, threads
    remove(path + "-warmup")
    gc.collect()
    reset = bh.reset_peak_rss()
    base = bh.peak_rss_bytes()
    t0 = time.perf_counter()
    rss_save(name, state, path, stager)
    commit = time.perf_counter() - t0
    peak = bh.peak_rss_bytes()
    remove(path)
    return {"base": base, "peak": peak, "extra": peak - base, "hwm_reset": reset,
            "commit": commit, "state_bytes": bh.state_bytes(state)}


def measure_rss(name: str, size_gib: float, workdir: str) -> dict:
    return bh.run_child([os.path.abspath(__file__), "--rss-child", name,
                         "--size-gib", str(size_gib), "--dir", workdir])


def run_rss(size_gib: float, workdir: str) -> dict:
    results = {}
    for name in RSS_RUNS:
        results[name] = measure_rss(name, size_gib, workdir)
        extra = results[name].get("extra")
        bh.log(f"rss {name}: {results[name].get('error') or f'{extra / MIB:.1f} MiB'}")
    return results


# ---- report ---------------------------------------------------------------------------------

def stall_rows(stalls: dict, raw_bytes: int) -> list[list[str]]:
    records = stalls["records"]
    clone, copy = med(records[CLONE], "stall"), med(records[COPY], "stall")
    dcp_stall = med(records[DCP_STAGED], "stall")
    rows = []
    for name, recs in records.items():
        stall = med(recs, "stall")
        if stall is None:
            rows.append([name, "ERROR: " + (first_error(recs) or "?")[:100]])
            continue
        first = stalls["first"].get(name, {}).get("stall")
        rows.append([name, f"{stall:.3f}", spread(recs, "stall", spec=".3f"),
                     f"{raw_bytes / stall / 1e9:.2f}", bh.fmt(ratio(stall, clone), ".2f"),
                     bh.fmt(ratio(stall, copy), ".2f"), bh.fmt(ratio(stall, dcp_stall), ".2f"),
                     bh.fmt(med(recs, "call"), ".3f"),
                     bh.fmt(med(recs, "commit"), ".2f"), bh.fmt(first, ".3f")])
        if first_error(recs):
            rows[-1][0] += " (some reps failed)"
    return rows


def rss_rows(rss: dict) -> list[list[str]]:
    dcp_extra = rss.get(DCP_STAGED, {}).get("extra")
    rows = []
    for name, r in rss.items():
        if "error" in r:
            rows.append([name, "ERROR: " + r["error"][:100]])
            continue
        budget, pool = RSS_RUNS[name]
        rows.append([name, bh.fmt(budget and budget / MIB, ".0f"),
                     bh.fmt(pool and pool / MIB, ".0f"),
                     f"{r['extra'] / MIB:.1f}", bh.fmt(ratio(r["extra"], budget), ".3f"),
                     bh.fmt(ratio(r["extra"], budget and budget + pool), ".3f"),
                     bh.fmt(ratio(r["extra"], dcp_extra), ".2f"), f"{r['commit']:.2f}"])
    return rows


def print_report(report: dict) -> None:
    raw, reps = report["state_bytes"], report["args"]["reps"]
    print(report["header"])
    print(f"\n=== state: {report['description']}")
    print(f"    {raw:,} bytes ({raw / bh.GIB:.3f} GiB)")
    print(f"\nSTALL, median of {reps} reps (s until the caller may change the state; "
          "GB/s = state bytes / stall)")
    print(bh.table(["contender", "stall s", "min-max", "GB/s", "x clone", "x copy_", "x DCP",
                    "call s", "commit s", "first save s"], stall_rows(report["stalls"], raw)))
    sc = report["stalls"]["records"][SHARDCKPT]
    print(f"    shardckpt h.stall_seconds median {bh.fmt(med(sc, 'stall_seconds'), '.3f')} s. "
          f"DCP (async stager): 'call s' is when async_save returns, the stall runs to "
          f"staging_completion; stager kept across saves. 'x DCP' is against that row.")
    print("\nPEAK EXTRA RSS, one fresh process each (peak RSS during one save to its commit, "
          "minus the RSS before it)")
    print(bh.table(["contender", "budget MiB", "pool MiB", "extra MiB", "x budget",
                    "x budget+pool", "x DCP", "commit s"], rss_rows(report["rss"])))
    print(f"    pool_bytes (shardckpt's native encode pool) comes on top of the staging budget by "
          f"design; the default-budget run uses the default pool "
          f"({WriteOptions.resolve().pool_bytes // MIB} MiB).")
    if any(not r.get("hwm_reset", True) for r in report["rss"].values()):
        print("    WARNING: RSS high-water mark not resettable here; growth below the state's "
              "build peak is hidden.")
    bh.print_checks(report["checks"])


def checks(report: dict) -> list[dict]:
    """The issue's targets, each as ``measured ratio <= limit``; info lines have no limit."""
    records, rss = report["stalls"]["records"], report["rss"]
    stall = {name: med(recs, "stall") for name, recs in records.items()}
    calls = med(records[DCP_STAGED], "call")
    budgeted = rss.get(f"shardckpt budget {BUDGET // MIB} MiB", {}).get("extra")
    default, dcp_extra = (rss.get(n, {}).get("extra") for n in
                          ("shardckpt default budget", DCP_STAGED))
    return [
        check("stall <= 1.2x memcpy (clone)", ratio(stall[SHARDCKPT], stall[CLONE]), 1.2),
        check("stall <= 0.5x DCP stall (to staging_completion)",
              ratio(stall[SHARDCKPT], stall[DCP_STAGED]), 0.5),
        check(f"extra RSS <= budget + 10% (budget {BUDGET // MIB} MiB; value = extra/budget)",
              ratio(budgeted, BUDGET), RSS_SLACK),
        check(f"extra RSS <= budget + pool_bytes + 10% ({(BUDGET + POOL) // MIB} MiB; "
              "value = extra/(budget+pool))", ratio(budgeted, BUDGET + POOL), RSS_SLACK),
        check("stall / memcpy into reused buffers (the tighter limit)",
              ratio(stall[SHARDCKPT], stall[COPY]), None),
        check("stall / DCP async_save call return (staging still running)",
              ratio(stall[SHARDCKPT], calls), None),
        check("stall / DCP async_save with no stager",
              ratio(stall[SHARDCKPT], stall[DCP_DEFAULT]), None),
        check("extra RSS, default budget / DCP's", ratio(default, dcp_extra), None),
    ]


# ---- the run ---------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="size of the state")
    p.add_argument("--reps", type=int, default=5, help="round-robin repetitions")
    p.add_argument("--dir", help="where to write (a fresh folder inside it; default /tmp)")
    p.add_argument("--json", help="write every measurement to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: 0.1 GiB, 1 rep")
    p.add_argument("--guarded", action="store_true", help="the guarded stall (guarded.py)")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args(argv)
    if args.quick:
        args.size_gib, args.reps = 0.1, 1
    return args


def stall_phase(args, workdir: str, report: dict) -> None:
    """Build the state, time the stalls; the state is freed before the memory runs start."""
    bh.log(f"building a {args.size_gib} GiB state")
    state, desc = states.llm_state(args.size_gib)
    report["description"], report["state_bytes"] = desc, bh.state_bytes(state)
    report["stalls"] = run_stalls(state, workdir, args.reps)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.size_gib, args.dir)))
        return 0
    torch.set_num_threads(CORES)
    os.makedirs(args.dir or tempfile.gettempdir(), exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="bench_async-", dir=args.dir)
    if args.guarded:
        return run_guarded(args, workdir)
    report = {"header": bh.header("bench/async_save"), "args": vars(args)}
    try:
        stall_phase(args, workdir, report)
        gc.collect()
        report["rss"] = run_rss(args.size_gib, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["checks"] = checks(report)
    print_report(report)
    bh.write_json(report, args.json)
    return 0


def run_guarded(args, workdir: str) -> int:
    try:
        result = guarded.run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(bh.header("bench/async_save --guarded"))
    result["checks"] = guarded.report(result, args.reps)
    bh.print_checks(result["checks"])
    bh.write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
