"""World-size-2 (gloo) saves and resharding loads (2->1, 2->4): shardckpt against DCP.

The state is row-sharded as FSDP2 holds it: every tensor whose first dimension covers the
largest loading world becomes a DTensor ``Shard(0)`` on a 1-D CPU mesh; scalars and tiny
tensors (AdamW's ``step``, type embeddings) stay plain, replicated tensors. The parent writes the
whole state once (``write_source``); each rank maps that file and keeps a copy of its own rows,
so every rank holds bit-identical pieces without rebuilding the state (which costs seconds per
rank, and whose real-training variant is not reproducible: dropout), and every loading rank can
check its rows against the same file.

All saves run inside ONE ``run_with_ranks(2, ...)`` (starting ranks is slow): contenders
alternate round-robin over the repetitions, the ranks meet at a barrier before each timed save,
and a save's wall is the slowest rank's. Loads run in one ``run_with_ranks(1, ...)`` and one
``run_with_ranks(4, ...)``: zeroed DTensor targets on the loading world's mesh, a page-cache
drop by rank 0 and a barrier before each, one load per contender checked bit for bit.
Functions named ``_..._rank`` run in the rank processes; the rest run in the parent.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

import harness as bh
from harness import (CORES, check, dcp_saver, first_error, local_part, med, ratio, remove,
                     rotated, shardckpt_saver, slug, spread)

warnings.filterwarnings("ignore")  # DCP and DTensor warnings would drown the progress lines

import shardckpt  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from shardckpt.testing import run_with_ranks  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402

SAVE_WORLD = 2
LOAD_WORLDS = (1, 4)
SHARD_MIN_ROWS = max(LOAD_WORLDS)  # fewer rows than loading ranks: kept whole (replicated)
DCP_DEFAULT = "DCP defaults"
DCP_THREADS = f"DCP thread_count={CORES}"
SHARDCKPT_AUTO = "shardckpt auto"
# Rank that wrote a data file, from its name: shardckpt's data/rank-NNNNN[.i].bin, DCP's
# __R_I.distcp. Anything else (manifest, .metadata) is shared.
RANK_FILE = re.compile(r"rank-(\d+)[.\d]*\.bin$|^__(\d+)_\d+\.distcp$")


# ---- contenders ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    name: str
    fn: Callable
    keep: bool = False  # its last repetition's checkpoint feeds the loads


SAVES = [
    Contender(SHARDCKPT_AUTO, shardckpt_saver("auto"), keep=True),
    Contender("shardckpt zstd", shardckpt_saver("zstd")),
    Contender("shardckpt raw", shardckpt_saver("raw")),
    Contender(DCP_DEFAULT, dcp_saver(), keep=True),
    Contender(DCP_THREADS, dcp_saver(thread_count=CORES)),
]
LOADS = {  # loader -> (the save it reads, fn(target, path))
    "shardckpt load": (SHARDCKPT_AUTO, lambda target, path: shardckpt.load(target, path)),
    "DCP load": (DCP_DEFAULT, lambda target, path: dcp.load(
        target, storage_reader=FileSystemReader(path))),
}
SHARDCKPT_LOAD, DCP_LOAD = "shardckpt load", "DCP load"


# ---- sharding (runs on the ranks) ------------------------------------------------------------

def _sharded(t: torch.Tensor) -> bool:
    return t.dim() >= 1 and t.shape[0] >= SHARD_MIN_ROWS


def _my_rows(source: torch.Tensor, mesh):
    """This rank's DTensor of ``source`` (rows copied out of the mapped file), or a copy."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    if not _sharded(source):
        return source.clone()
    # src_data_rank=None: split locally, no scatter; every rank holds the same source.
    d = distribute_tensor(source, mesh, [Shard(0)], src_data_rank=None)
    return DTensor.from_local(d.to_local().clone(), mesh, d.placements, run_check=False,
                              shape=d.shape, stride=d.stride())


def _zeros_like_sharded(source: torch.Tensor, mesh):
    from torch.distributed.tensor import Shard, zeros
    if not _sharded(source):
        return torch.zeros_like(source)
    return zeros(source.shape, dtype=source.dtype, device_mesh=mesh, placements=[Shard(0)])


def _expected_rows(source: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rows of ``source`` that rank ``rank`` of ``world`` holds (torch.chunk, as Shard(0))."""
    if not _sharded(source):
        return source
    chunks = source.chunk(world, dim=0)
    return chunks[rank] if rank < len(chunks) else source[:0]


def _open_source(path: str):
    return torch.load(path, mmap=True, weights_only=True)


def _subset(state, keys: list[str]) -> dict:
    """The tensors at the flattened ``keys`` of ``state``, as a flat dict (warm-ups)."""
    flat = {"/".join(p): v for p, v in bh.leaves(state)}
    return {k.replace("/", "."): flat[k] for k in keys}


def _warmup_keys(source) -> list[str]:
    return ["/".join(p) for p, v in bh.leaves(source) if isinstance(v, torch.Tensor)][-4:]


def _first_difference(target, source, rank: int, world: int) -> str | None:
    """The first tensor whose local piece is not bit-identical to its rows of the source."""
    expected = dict(bh.leaves(source))
    for path, got in bh.leaves(target):
        if not isinstance(got, torch.Tensor):
            continue
        want, got = _expected_rows(expected[path], rank, world), local_part(got)
        key = "/".join(path)
        if want.shape != got.shape or want.dtype != got.dtype:
            return f"{key}: shape/dtype {tuple(got.shape)} {got.dtype}, expected " \
                   f"{tuple(want.shape)} {want.dtype}"
        if not torch.equal(bh.byte_view(want), bh.byte_view(got)):
            return f"{key}: values differ"
    return None


# ---- the save world (runs on the ranks) ------------------------------------------------------

def rank_bytes(path: str) -> dict:
    """``{"total", "ranks": {rank: bytes of its data files}, "shared"}`` of a checkpoint."""
    out = {"total": 0, "ranks": {}, "shared": 0}
    for root, _, files in os.walk(path):
        for name in files:
            size = os.path.getsize(os.path.join(root, name))
            out["total"] += size
            m = RANK_FILE.search(name)
            if m:
                r = int(m.group(1) or m.group(2))
                out["ranks"][r] = out["ranks"].get(r, 0) + size
            else:
                out["shared"] += size
    out["ranks"] = [out["ranks"].get(r, 0) for r in range(max(out["ranks"], default=-1) + 1)]
    return out


def _timed_save(c: Contender, state, path: str, rank: int) -> dict:
    """One save, timed on this rank from a common start; rank 0 measures the folder after."""
    if rank == 0:
        os.sync()  # the previous contender's deletions must not be flushed on this one's clock
    try:
        wall, extra = bh.from_barrier(lambda: c.fn(state, path))
        record = {**(extra or {}), "wall": wall}
    except Exception as exc:  # noqa: BLE001 - one failing contender must not abort the run
        record = bh.error_record(exc)
    dist.barrier()  # every rank is done before the folder is measured or removed
    if rank == 0 and "error" not in record:
        record["disk"] = rank_bytes(path)
    return record


def _save_rank(rank: int, world: int, label: str, source_path: str, workdir: str,
               reps: int) -> dict:
    """Every save contender, ``reps`` round-robin repetitions; this rank's records."""
    mesh = bh.cpu_mesh(world)
    source = _open_source(source_path)
    state = bh.map_state(source, lambda t: _my_rows(t, mesh))
    keys = _warmup_keys(source)
    del source  # unmaps the file: each rank now holds only its own rows
    out = {"rank": rank, "local_bytes": sum(local_part(t).numel() * local_part(t).element_size()
                                            for t in bh.tensors_of(state)),
           "saves": {c.name: [] for c in SAVES}, "kept": {}, "warmup": {}}
    small = _subset(state, keys)
    for c in SAVES:  # lazy imports and first-call setup, off the clock
        path = os.path.join(workdir, f"dist{label}-warmup-{slug(c.name)}")
        out["warmup"][c.name] = path if c.keep else None
        record = _timed_save(c, small, path, rank)
        if rank == 0 and not c.keep:
            remove(path)
        if "error" in record:
            out["warmup_error"] = f"{c.name}: {record['error']}"
    for rep in range(reps):
        for c in rotated(SAVES, rep):
            path = os.path.join(workdir, f"dist{label}-{slug(c.name)}-r{rep}")
            record = _timed_save(c, state, path, rank)
            out["saves"][c.name].append(record)
            if rank == 0:
                bh.log(f"(dist {label}) save rep {rep + 1}/{reps} {c.name}: "
                       f"{record.get('error') or format(record['wall'], '.2f') + ' s on rank 0'}")
                if c.keep and rep == reps - 1 and "error" not in record:
                    out["kept"][c.name] = path
                else:
                    remove(path)
    return out


# ---- the load worlds (run on the ranks) ------------------------------------------------------

def _timed_load(name: str, target, path: str, rank: int, cold: bool) -> dict:
    for t in bh.tensors_of(target):
        local_part(t).zero_()  # a loader that silently skips a tensor must not pass the check
    if rank == 0 and cold:
        bh.drop_page_cache()
    try:
        wall, _ = bh.from_barrier(lambda: LOADS[name][1](target, path))
        return {"wall": wall}
    except Exception as exc:  # noqa: BLE001 - one failing contender must not abort the run
        return bh.error_record(exc)


def _load_rank(rank: int, world: int, label: str, source_path: str, kept: dict, warmup: dict,
               reps: int, cold_ok: bool) -> dict:
    """Every loader into zeroed ``Shard(0)`` targets on this world; this rank's records."""
    mesh = bh.cpu_mesh(world)
    source = _open_source(source_path)
    target = bh.map_state(source, lambda t: _zeros_like_sharded(t, mesh))
    small = _subset(target, _warmup_keys(source))
    for name, (saver, _) in LOADS.items():
        if warmup.get(saver):
            _timed_load(name, small, warmup[saver], rank, cold=False)
    out = {"rank": rank, "loads": {name: [] for name in LOADS}}
    for rep in range(reps):
        for name in rotated(list(LOADS), rep):
            path = kept.get(LOADS[name][0])
            if path is None:
                out["loads"][name].append({"error": f"no checkpoint from {LOADS[name][0]}"})
                continue
            record = _timed_load(name, target, path, rank, cold_ok)
            if rep == 0 and "error" not in record:  # off the clock: once per contender
                record["check"] = _first_difference(target, source, rank, world) or "ok"
            out["loads"][name].append(record)
            if rank == 0:
                bh.log(f"(dist {label}) load {SAVE_WORLD}->{world} rep {rep + 1}/{reps} {name}: "
                       f"{record.get('error') or format(record['wall'], '.2f') + ' s on rank 0'}")
    return out


# ---- the parent: run, merge the ranks' records -----------------------------------------------

def write_source(state, workdir: str, label: str) -> str:
    """The whole state as one file the ranks map (written once, outside every clock)."""
    path = os.path.join(workdir, f"dist{label}-source.pt")
    torch.save(state, path)
    os.sync()  # its dirty pages must not be written back during the timed saves
    return path


def merge(per_rank: list[list[dict]]) -> list[dict]:
    """One record per repetition from every rank's: slowest rank's wall, each rank's too."""
    merged = []
    for rep_records in zip(*per_rank):
        errors = [f"rank {r}: {rec['error']}" for r, rec in enumerate(rep_records)
                  if "error" in rec]
        rec = {"rank_walls": [r.get("wall") for r in rep_records]}
        if errors:
            rec["error"] = "; ".join(errors)
        else:
            rec["wall"] = max(rec["rank_walls"])
        disk = rep_records[0].get("disk")  # rank 0 measured the folder
        if disk:
            rec.update(disk_bytes=disk["total"], rank_disk_bytes=disk["ranks"],
                       shared_disk_bytes=disk["shared"])
        checks = [r.get("check") for r in rep_records if r.get("check")]
        if checks:
            bad = [f"rank {r}: {c}" for r, c in enumerate(checks) if c != "ok"]
            rec["check"] = "; ".join(bad) or "ok"
            if bad:
                rec["error"] = f"wrong data: {rec['check']}"
        merged.append(rec)
    return merged


def run_dist(label: str, source_path: str, desc: str, workdir: str, reps: int,
             cold_ok: bool) -> dict:
    """Saves on 2 ranks, then loads on 1 and on 4; every measurement, merged and raw."""
    source = _open_source(source_path)
    run = {"description": desc, "raw_bytes": bh.state_bytes(source), "reps": reps,
           "tensors": len(bh.tensors_of(source)),
           "sharded": sum(_sharded(t) for t in bh.tensors_of(source)), "cold": cold_ok}
    del source
    # run_with_ranks' own deadline, so that a hung collective still ends the run: generous
    # (30 s per GiB per timed operation) beside the few seconds per GiB a save or load takes.
    timeout = 300.0 + 30.0 * run["raw_bytes"] / bh.GIB * reps * len(SAVES)
    t0 = time.perf_counter()
    bh.log(f"(dist {label}) {SAVE_WORLD} ranks: saving")
    ranks = [r.value for r in run_with_ranks(SAVE_WORLD, _save_rank, label, source_path,
                                             workdir, reps, timeout=timeout)]
    run["local_bytes"] = [r["local_bytes"] for r in ranks]
    run["warmup_error"] = next((r["warmup_error"] for r in ranks if "warmup_error" in r), None)
    run["saves"] = {c.name: merge([r["saves"][c.name] for r in ranks]) for c in SAVES}
    run["save_ranks"] = ranks  # every rank's own records, shardckpt's per-rank stats included
    kept, warmup = ranks[0]["kept"], ranks[0]["warmup"]
    run["loads"], run["load_ranks"] = {}, {}
    for world in LOAD_WORLDS:
        bh.log(f"(dist {label}) {world} rank(s): loading")
        loaded = [r.value for r in run_with_ranks(world, _load_rank, label, source_path, kept,
                                                  warmup, reps, cold_ok,
                                                  timeout=timeout)]
        worlds = f"{SAVE_WORLD}->{world}"
        run["loads"][worlds] = {name: merge([r["loads"][name] for r in loaded]) for name in LOADS}
        run["load_ranks"][worlds] = loaded
    for path in list(kept.values()) + [p for p in warmup.values() if p]:
        remove(path)
    run["seconds"] = time.perf_counter() - t0
    return run


# ---- report ----------------------------------------------------------------------------------

def _per_rank(records: list, key: str, spec: str) -> str:
    n = max((len(r.get(key) or []) for r in records), default=0)
    return " / ".join(bh.fmt(med(records, key, i), spec) for i in range(n)) or "-"


def save_rows(saves: dict, raw_bytes: int) -> list[list[str]]:
    dcp_wall, dcp_bytes = med(saves[DCP_DEFAULT], "wall"), med(saves[DCP_DEFAULT], "disk_bytes")
    rows = []
    for name, records in saves.items():
        wall, size = med(records, "wall"), med(records, "disk_bytes")
        if wall is None:
            rows.append([name, "ERROR: " + (first_error(records) or "?")[:110]])
            continue
        rows.append([name + (" (some reps failed)" if first_error(records) else ""),
                     f"{wall:.3f}", spread(records, "wall"), f"{raw_bytes / wall / 1e9:.2f}",
                     _per_rank(records, "rank_walls", ".3f"), bh.fmt(size and int(size), ",d"),
                     _per_rank(records, "rank_disk_bytes", ",.0f"),
                     bh.fmt(ratio(size, dcp_bytes), ".3f"), bh.fmt(ratio(wall, dcp_wall), ".2f")])
    return rows


def load_rows(loads: dict, raw_bytes: int) -> list[list[str]]:
    rows = []
    for worlds, by_loader in loads.items():
        dcp_wall = med(by_loader[DCP_LOAD], "wall")
        for name, records in by_loader.items():
            wall = med(records, "wall")
            if wall is None or first_error(records):
                rows.append([f"{name} {worlds}", "ERROR: " + (first_error(records) or "?")[:110]])
                continue
            rows.append([f"{name} {worlds}", f"{wall:.3f}", spread(records, "wall"),
                         f"{raw_bytes / wall / 1e9:.2f}", _per_rank(records, "rank_walls", ".3f"),
                         bh.fmt(ratio(wall, dcp_wall), ".2f"), records[0].get("check", "-")])
    return rows


def print_report(label: str, run: dict) -> None:
    raw = run["raw_bytes"]
    print(f"\n=== dist state ({label}), {SAVE_WORLD} gloo ranks: {run['description']}")
    held = " / ".join(f"{b:,}" for b in run["local_bytes"])
    print(f"    {raw:,} bytes in {run['tensors']} tensors ({raw / bh.GIB:.3f} GiB); "
          f"{run['sharded']} row-sharded (Shard(0)), {run['tensors'] - run['sharded']} replicated")
    print(f"    held per rank {held} bytes; this section took {run['seconds']:.0f} s")
    if run.get("warmup_error"):
        print(f"    warm-up error: {run['warmup_error']}")
    print(f"\nDIST SAVE ({label}), {SAVE_WORLD} ranks, median of {run['reps']} reps; wall = "
          f"slowest rank from a common barrier; GB/s = whole state / wall")
    print(bh.table(["contender", "wall s", "min-max", "GB/s", "per rank s", "bytes on disk",
                    "per rank bytes", "disk/DCP", "x DCP"], save_rows(run["saves"], raw)))
    cold = "after a page-cache drop" if run["cold"] else "WARM CACHE (cache not droppable)"
    print(f"\nDIST LOAD ({label}), resharding into zeroed Shard(0) targets, median of "
          f"{run['reps']} reps, {cold}; {SAVE_WORLD}->4 shares {CORES} cores among 4 ranks")
    print(bh.table(["contender", "wall s", "min-max", "GB/s", "per rank s", "x DCP", "check"],
                   load_rows(run["loads"], raw)))


# ---- target checks ---------------------------------------------------------------------------

def _worst_rank_ratio(records: list, base: list, key: str) -> float | None:
    """The largest per-rank ratio of medians (rank r's contender over rank r's baseline)."""
    n = max((len(r.get(key) or []) for r in records + base), default=0)
    ratios = [ratio(med(records, key, i), med(base, key, i)) for i in range(n)]
    return None if not ratios or None in ratios else max(ratios)


def _pair(what: str, records: list, base: list, key: str, total_key: str, limit) -> list[dict]:
    return [check(f"{what} (total)", ratio(med(records, total_key), med(base, total_key)), limit),
            check(f"{what} (worst rank)", _worst_rank_ratio(records, base, key), limit)]


def dist_checks(label: str, run: dict) -> list[dict]:
    """The issue's targets on 2 ranks, each for the slowest rank (total) and rank by rank."""
    s, tag = run["saves"], f"(dist {label})"
    auto, dcp_default = s[SHARDCKPT_AUTO], s[DCP_DEFAULT]
    out = _pair(f"{tag} save auto <= 0.6x DCP defaults", auto, dcp_default, "rank_walls",
                "wall", 0.6)
    out += _pair(f"{tag} save auto <= 1.0x {DCP_THREADS}", auto, s[DCP_THREADS], "rank_walls",
                 "wall", 1.0)
    limit = 0.86 if label == "b" else None  # (a) is half bf16: its target is the bf16 subset's
    what = f"{tag} zstd bytes " + ("<= 0.86x DCP" if limit else "/ DCP, half bf16")
    out += _pair(what, s["shardckpt zstd"], dcp_default, "rank_disk_bytes", "disk_bytes", limit)
    for worlds, by_loader in run["loads"].items():
        pair = _pair(f"{tag} load {worlds} <= 0.8x DCP load", by_loader[SHARDCKPT_LOAD],
                     by_loader[DCP_LOAD], "rank_walls", "wall", 0.8)
        out += pair if worlds != f"{SAVE_WORLD}->1" else pair[:1]  # one rank: total is it
    return out
