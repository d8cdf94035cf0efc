"""Save and load to S3 (moto's server on loopback): shardckpt vs DCP's fsspec writer and reader.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/bench/storage.py [--size-gib 0.25] [--reps 3]
        [--json OUT]

State: states.llm_state of ``--size-gib`` (half bf16 weights, half a ZeRO-1 rank's fp32
optimizer share). The S3 server is moto in a child process (``shardckpt.testing.s3_server``),
reached through s3fs, so it does not share this interpreter's GIL; it keeps objects in memory.
Contenders run round-robin within each repetition (the starting one rotates); each saves to a
fresh prefix, loads back into preallocated tensors (checked bit for bit), and the prefix is
deleted. Reported: medians and min-max of wall seconds, and shardckpt / DCP ratios.

DCP runs ``FsspecWriter(sync_files=False)``: with ``sync_files=True`` (its default) it calls
fsync on S3 file objects, which fails (pytorch#144752). It writes one file per rank with its
default ``thread_count=1``. shardckpt runs its defaults (codec ``auto``), ``raw`` and ``zstd``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as bh  # noqa: E402
from harness import (first_difference, flat_tensors, fmt, log, map_state, med,  # noqa: E402
                     ratio, spread, state_bytes, table, write_json)
from states import llm_state  # noqa: E402


def _shardckpt(codec):
    import shardckpt

    def save(state, url, opts):
        shardckpt.save(state, url, codec=codec, storage_options=opts)

    def load(target, url, opts):
        shardckpt.load(target, url, storage_options=opts)
    return save, load


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    def save(state, url, opts):
        dcp.save(state, storage_writer=FsspecWriter(url, sync_files=False, **opts))

    def load(target, url, opts):
        dcp.load(target, storage_reader=FsspecReader(url, **opts))
    return save, load


CONTENDERS = {"shardckpt auto": _shardckpt("auto"), "shardckpt raw": _shardckpt("raw"),
              "shardckpt zstd": _shardckpt("zstd"),
              "DCP fsspec": _dcp()}


def run_one(name, state, base, opts, fs) -> dict:
    save, load = CONTENDERS[name]
    url = f"{base}/{uuid.uuid4().hex[:10]}"
    t0 = time.perf_counter()
    save(state, url, opts)
    t_save = time.perf_counter() - t0
    stored = sum(fs.du(url[len("s3://"):], total=False).values())
    target = map_state(state, torch.empty_like)
    t0 = time.perf_counter()
    load(target, url, opts)
    t_load = time.perf_counter() - t0
    diff = first_difference(flat_tensors(state)[0], flat_tensors(target)[0])
    fs.rm(url[len("s3://"):], recursive=True)
    return {"save": t_save, "load": t_load, "stored": stored, "diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=0.25)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    import s3fs
    from shardckpt.testing.s3_server import moto_s3

    state, desc = llm_state(args.size_gib)
    log(f"state: {desc}, {state_bytes(state) / 2**20:.0f} MiB")
    with moto_s3(bucket="bench", process=True) as (opts, base):
        fs = s3fs.S3FileSystem(**opts)
        for name in CONTENDERS:  # warm-up: imports, connections, first allocations
            run_one(name, map_state(state, lambda t: t[:2].clone()), base, opts, fs)

        def measure(name, rep):
            rec = run_one(name, state, base, opts, fs)
            if rec["diff"]:
                raise SystemExit(f"{name} loaded wrong data: {rec['diff']}")
            return rec
        records = bh.round_robin(list(CONTENDERS), args.reps, measure,
                                 lambda r: f"save {r['save']:.2f} s, load {r['load']:.2f} s")
    dcp_save, dcp_load = med(records["DCP fsspec"], "save"), med(records["DCP fsspec"], "load")
    rows = []
    for name, recs in records.items():
        s, l = med(recs, "save"), med(recs, "load")
        rows.append([name, fmt(s, ".2f"), spread(recs, "save"), fmt(l, ".2f"),
                     spread(recs, "load"), fmt(med(recs, "stored") / 2**20, ".0f"),
                     fmt(ratio(s, dcp_save), ".2f"), fmt(ratio(l, dcp_load), ".2f")])
    print(f"S3 (moto on loopback), {desc}, {args.reps} reps, medians")
    print(table(["contender", "save s", "min-max", "load s", "min-max", "MiB stored",
                 "save/DCP", "load/DCP"], rows))
    write_json({"desc": desc, "records": records}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
