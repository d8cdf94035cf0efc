"""Coordination cost of a distributed save, simulated for many ranks in one process.

Usage:
    python scripts/bench_coordination.py [--ranks 256,1024,4096] [--tensors 500] [--reps 1]

Each simulated rank holds a Shard(0) piece of every tensor (uneven sizes), a few replicated plain
tensors and a per-rank data position, described as ``plan.local_plan`` does it. Timed, as the coordinator (rank 0)
does it: parsing every rank's JSON plan, ``merge_plans`` (replica dedup, write assignment),
parsing every rank's JSON write report, ``build_manifest`` and serializing it, and writing it
with fsync. Not timed: what each rank does for itself in parallel (its own plan and report),
reported per rank. The target (issue: distributed save) is <= 2 s at 4096 ranks x 500 tensors;
DCP's plan validation is quadratic (pytorch#163548: > 200 s at 1024 ranks x 1024 tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import numpy as np  # noqa: E402

from shardckpt import manifest as manifest_mod, tables  # noqa: E402
from shardckpt.merge import build_manifest, merge_plans  # noqa: E402
from shardckpt.tree import split_values  # noqa: E402

REPLICATED = 10  # of the tensors, how many are plain replicated tensors (norms, counters)


def rank_plan(rank: int, ranks: int, tensors: int) -> dict:
    """What ``plan.local_plan`` sends for this rank (built with its own helpers): the layout,
    the tree's skeleton and values (the data position differs per rank), boxes, checksums."""
    layout, boxes, crcs, tree = [], [], [], []
    for t in range(tensors):
        key = f"model/layers.{t // 8}.w{t % 8}"
        if t < REPLICATED:
            layout.append([key, "float32", [4096], False])
            boxes.append([0, 0, 4096, 0])
            crcs.append(12345 + t)
        else:
            rows_total = ranks * 3 + t % 7  # uneven: some ranks hold one row more
            per, extra = divmod(rows_total, ranks)
            start = rank * per + min(rank, extra)
            layout.append([key, "bfloat16", [rows_total, 512], True])
            boxes.append([start, 0, per + (rank < extra), 512])
            crcs.append(-1)
        tree.append([key.split("/", 1)[1], {"tensor": key}])
    state_tree = {"dict": [["model", {"dict": tree}], ["step", {"int": 100}],
                           ["data", {"dict": [["position", {"int": 1000 + rank}]]}]]}
    skeleton, values = split_values(state_tree)
    text = tables.pack_text
    return {"layout": text(layout), "skeleton": text(skeleton), "values": text(values),
            "width": 2, "boxes": tables.encode(np.array(boxes, np.int64)),
            "crc": tables.encode(np.array(crcs, np.int64))}


def rank_report(rank: int, plan: dict, assigned: np.ndarray) -> dict:
    """What ``saver.write_rank`` sends back: one chunk per assigned piece, in one file."""
    layout = tables.unpack_text(plan["layout"], "plan")
    box = tables.decode(plan["boxes"], 4, "plan")
    pieces, chunks, offset = [], [], 16
    for index in assigned:
        _, dtype, _, _ = layout[index]
        count = int(box[index, 2] * (box[index, 3] or 1))
        length = count * (2 if dtype == "bfloat16" else 4)
        pieces.append([index, 1])
        chunks.append([0, offset, length, 0, count, 0, 0xDEADBEEF])
        offset += length
    return {"files": [{"path": f"data/rank-{rank:05d}.bin", "size": offset}], "codecs": [[]],
            "pieces": tables.encode(np.array(pieces, np.int64)),
            "chunks": tables.encode(np.array(chunks, np.int64)), "raw_bytes": offset - 16}


def simulate(ranks: int, tensors: int, workdir: str) -> dict:
    t0 = time.perf_counter()
    plan_texts = [json.dumps(rank_plan(r, ranks, tensors)) for r in range(ranks)]
    per_rank_plan = (time.perf_counter() - t0) / ranks

    t0 = time.perf_counter()
    plans = {r: json.loads(text) for r, text in enumerate(plan_texts)}
    gp = merge_plans(plans)
    answers = {r: json.dumps({"assign": tables.encode(a)}) for r, a in gp.assign.items()}
    t_plan = time.perf_counter() - t0
    assert len(answers) == ranks

    reports = [json.dumps(rank_report(r, plans[r], gp.assign[r])) for r in range(ranks)]
    t0 = time.perf_counter()
    results = {r: json.loads(text) for r, text in enumerate(reports)}
    manifest = manifest_mod.to_json(build_manifest(gp, plans, results, {}))
    path = os.path.join(workdir, f"manifest-{ranks}.json")
    with open(path, "wb") as f:
        f.write(manifest)
        f.flush()
        os.fsync(f.fileno())
    t_commit = time.perf_counter() - t0
    os.unlink(path)
    return {"ranks": ranks, "tensors": tensors, "pieces": ranks * tensors,
            "plan_s": t_plan, "commit_s": t_commit, "total_s": t_plan + t_commit,
            "manifest_mb": len(manifest) / 1e6, "per_rank_plan_ms": per_rank_plan * 1e3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="256,1024,4096")
    p.add_argument("--tensors", type=int, default=500)
    args = p.parse_args(argv)
    print(f"{'ranks':>6} {'tensors':>7} {'pieces':>9} {'merge s':>8} {'commit s':>9} "
          f"{'total s':>8} {'manifest MB':>11} {'ns/piece':>9}")
    with tempfile.TemporaryDirectory() as workdir:
        for ranks in (int(r) for r in args.ranks.split(",")):
            r = simulate(ranks, args.tensors, workdir)
            print(f"{r['ranks']:>6} {r['tensors']:>7} {r['pieces']:>9} {r['plan_s']:>8.2f} "
                  f"{r['commit_s']:>9.2f} {r['total_s']:>8.2f} {r['manifest_mb']:>11.1f} "
                  f"{r['total_s'] / r['pieces'] * 1e9:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
