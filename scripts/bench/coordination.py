"""Coordination cost of a distributed save, simulated for many ranks in one process.

Usage:
    python scripts/bench/coordination.py [--ranks 1024,4096,16384,65536] [--tensors 500]
                                         [--form index|inline]

Each simulated rank holds a Shard(0) piece of every tensor (uneven sizes), a few replicated plain
tensors and a per-rank data position, described as ``plan.local_plan`` does it. ``--form index``
(the default for several ranks, FORMAT.md 3.7): the Shard(0) pieces go by their grid rule and
each rank writes its chunk rows into its own index file, so the reports carry only file names;
``--form inline`` is revision 1.3 (a box per piece, every chunk row through the coordinator).
Timed, as the coordinator (rank 0) does it: parsing every rank's JSON plan, ``merge_plans``
(replica dedup, write assignment) and encoding every rank's answer, parsing every rank's JSON
write report, ``build_manifest``, ``check_complete`` and serializing it, and writing it with
fsync. Not timed: what each rank does for itself in parallel (its own plan and report). Memory: the process's resident set when the timed part starts (the ranks'
plan and report texts, which the coordinator must receive) and its peak during it (Linux
VmHWM, reset first); each size gets its own process so that sizes do not share peaks. The target (issue: distributed save) is <= 2 s at 4096 ranks x 500 tensors;
DCP's plan validation is quadratic (pytorch#163548: > 200 s at 1024 ranks x 1024 tensors).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402

import harness as bh  # noqa: E402 - this folder is first on the path

from shardckpt.format import chunk_index, grid, manifest as manifest_mod, tables  # noqa: E402
from shardckpt.save.merge import build_manifest, merge_plans, target_rows  # noqa: E402
from shardckpt.format.tree import split_values  # noqa: E402

REPLICATED = 10  # of the tensors, how many are plain replicated tensors (norms, counters)


@functools.lru_cache(maxsize=2)
def _common(ranks: int, tensors: int) -> tuple:
    """What every rank's plan shares (built once per size): the layout and skeleton texts, the
    values (the data position is patched per rank), each tensor's row count and checksum."""
    layout, tree, rows, crcs = [], [], [], []
    for t in range(tensors):
        key = f"model/layers.{t // 8}.w{t % 8}"
        if t < REPLICATED:
            layout.append([key, "float32", [4096], False])
            rows.append(-1)
            crcs.append(12345 + t)
        else:
            rows.append(ranks * 3 + t % 7)  # uneven: some ranks hold one row more
            layout.append([key, "bfloat16", [rows[-1], 512], True])
            crcs.append(-1)
        tree.append([key.split("/", 1)[1], {"tensor": key}])
    state_tree = {"dict": [["model", {"dict": tree}], ["step", {"int": 100}],
                           ["data", {"dict": [["position", {"int": -1}]]}]]}
    skeleton, values = split_values(state_tree)
    at = values.index({"int": -1})  # the data position among the values
    text = tables.pack_text
    return (text(layout), text(skeleton), values, at, np.array(rows, np.int64),
            tables.encode(np.array(crcs, np.int64)))


@functools.lru_cache(maxsize=2)
def _rules(ranks: int, tensors: int) -> tuple:
    """The grid field every rank sends (one rule: Shard(0) over a mesh of all ranks, cells of
    sizes differing by one) and the box rows of the replicated tensors."""
    rule = json.dumps([[[ranks], [0]], [[0, "even"]]], separators=(",", ":"))
    items = [[t, 0] for t in range(REPLICATED, tensors)]
    boxes = np.zeros((REPLICATED, 4), np.int64)
    boxes[:, 2] = 4096
    return tables.pack_text({"rules": [rule], "items": items}), tables.encode(boxes)


def rank_plan(rank: int, ranks: int, tensors: int, form: str = "index") -> dict:
    """What ``plan.local_plan`` sends for this rank (built with its own helpers): the layout,
    the tree's skeleton and values (the data position differs per rank), boxes (with rules,
    only those of the replicated tensors), checksums."""
    layout, skeleton, values, at, rows, crc = _common(ranks, tensors)
    values = values[:at] + [{"int": 1000 + rank}] + values[at + 1:]
    if form == "index":
        rules, boxes = _rules(ranks, tensors)
        return {"layout": layout, "skeleton": skeleton, "values": tables.pack_text(values),
                "width": 2, "boxes": boxes, "crc": crc, "grid": rules}
    per, extra = np.divmod(rows, ranks)
    boxes = np.zeros((tensors, 4), np.int64)
    sharded = rows >= 0
    boxes[sharded, 0] = rank * per[sharded] + np.minimum(rank, extra[sharded])
    boxes[sharded, 2] = per[sharded] + (rank < extra[sharded])
    boxes[sharded, 3] = 512
    boxes[~sharded, 2] = 4096
    return {"layout": layout, "skeleton": skeleton, "values": tables.pack_text(values),
            "width": 2, "boxes": tables.encode(boxes), "crc": crc}


def _piece_boxes(rank: int, ranks: int, tensors: int, assigned: np.ndarray) -> np.ndarray:
    """The boxes of this rank's assigned pieces (the rank knows its own pieces)."""
    _, _, _, _, rows, _ = _common(ranks, tensors)
    boxes = np.zeros((tensors, 4), np.int64)
    sharded = rows >= 0
    start, size = grid.cell_bounds(rows[sharded], ranks, "even", rank)
    boxes[sharded, 0], boxes[sharded, 2], boxes[sharded, 3] = start, size, 512
    boxes[~sharded, 2] = 4096
    return boxes[assigned]


def rank_report(rank: int, ranks: int, tensors: int, answer: np.ndarray, form: str) -> tuple:
    """What ``saver.write_rank`` sends back, and (index form) the index file it writes: one
    chunk per assigned piece, in one file."""
    assigned = answer[:, 0] if form == "index" else answer
    box = _piece_boxes(rank, ranks, tensors, assigned)
    count = box[:, 2] * np.where(box[:, 3] > 0, box[:, 3], 1)
    length = count * np.where(box[:, 3] > 0, 2, 4)  # bf16 pieces are 2-D, fp32 ones 1-D
    offset = 16 + np.cumsum(length) - length
    n = len(assigned)
    chunks = np.column_stack([np.zeros(n, np.int64), offset, length, np.zeros(n, np.int64),
                              count, np.zeros(n, np.int64), np.full(n, 0xDEADBEEF, np.int64)])
    size = int(16 + length.sum())
    files = [{"path": f"data/rank-{rank:05d}.bin", "size": size}]
    if form == "index":
        rows = np.column_stack([answer[:, 1:], chunks]).reshape(-1, chunk_index.COLUMNS)
        data = chunk_index.to_bytes(rank, [files[0]["path"]], [[]], rows)
        from shardckpt import codecs
        index = {"path": chunk_index.index_path(rank), "size": len(data),
                 "crc32c": codecs.backend.crc32c(data)}
        return {"files": files, "index": index, "raw_bytes": size - 16}, len(data)
    pieces = np.column_stack([assigned, np.ones(n, np.int64)])
    return {"files": files, "codecs": [[]], "pieces": tables.encode(pieces),
            "chunks": tables.encode(chunks.reshape(-1, 7)), "raw_bytes": size - 16}, 0


def simulate(ranks: int, tensors: int, workdir: str, form: str = "index") -> dict:
    t0 = time.perf_counter()
    plan_texts = [json.dumps(rank_plan(r, ranks, tensors, form)) for r in range(ranks)]
    per_rank_plan = (time.perf_counter() - t0) / ranks

    bh.reset_peak_rss()
    before = bh.rss_bytes()
    t0 = time.perf_counter()
    plans = {r: json.loads(text) for r, text in enumerate(plan_texts)}
    gp = merge_plans(plans, indexed=form == "index")
    if form == "index":
        common = json.dumps({"templates": gp.templates})
        answers = {r: json.dumps({"mine": a}) for r, a in gp.answers.items()}
    else:
        answers = {r: json.dumps({"mine": tables.encode(a)}) for r, a in gp.assign.items()}
    t_plan = time.perf_counter() - t0
    assert len(answers) == ranks
    if form == "index":  # each rank's own decoding of its answer (not timed)
        common, cache = json.loads(common), {}
        mine = {r: target_rows(common, json.loads(a)["mine"], cache) for r, a in answers.items()}
    else:
        mine = gp.assign
    del answers

    reports, index_bytes = [], 0
    for r in range(ranks):  # what each rank does for itself, in parallel on a real job
        report, size = rank_report(r, ranks, tensors, mine[r], form)
        reports.append(json.dumps(report))
        index_bytes += size
    t0 = time.perf_counter()
    results = {r: json.loads(text) for r, text in enumerate(reports)}
    m = build_manifest(gp, plans, results, {})
    manifest_mod.check_complete(m, "simulated")
    manifest = manifest_mod.to_json(m)
    path = os.path.join(workdir, f"manifest-{ranks}.json")
    with open(path, "wb") as f:
        f.write(manifest)
        f.flush()
        os.fsync(f.fileno())
    t_commit = time.perf_counter() - t0
    peak = bh.peak_rss_bytes()
    os.unlink(path)
    return {"ranks": ranks, "tensors": tensors, "pieces": ranks * tensors,
            "plan_s": t_plan, "commit_s": t_commit, "total_s": t_plan + t_commit,
            "manifest_mb": len(manifest) / 1e6, "per_rank_plan_ms": per_rank_plan * 1e3,
            "inputs_mb": before / 1e6, "peak_mb": peak / 1e6, "growth_mb": (peak - before) / 1e6,
            "index_mb_per_rank": index_bytes / ranks / 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1024,4096,16384,65536")
    p.add_argument("--tensors", type=int, default=500)
    p.add_argument("--form", choices=("index", "inline"), default="index")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one size, as JSON (internal)
    args = p.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(simulate(args.one, args.tensors, workdir, args.form)))
        return 0
    print(f"{'ranks':>6} {'tensors':>7} {'pieces':>9} {'merge s':>8} {'commit s':>9} "
          f"{'total s':>8} {'manifest MB':>11} {'ns/piece':>9} {'RSS before MB':>13} "
          f"{'peak RSS MB':>11} {'growth MB':>9}")
    for ranks in (int(r) for r in args.ranks.split(",")):
        r = bh.run_child([__file__, "--one", str(ranks), "--tensors", str(args.tensors),
                          "--form", args.form], timeout=None)
        if "error" in r:
            print(f"{ranks:>6} failed: {r['error']}", flush=True)
            continue
        print(f"{r['ranks']:>6} {r['tensors']:>7} {r['pieces']:>9} {r['plan_s']:>8.2f} "
              f"{r['commit_s']:>9.2f} {r['total_s']:>8.2f} {r['manifest_mb']:>11.1f} "
              f"{r['total_s'] / r['pieces'] * 1e9:>9.0f} {r['inputs_mb']:>13.0f} "
              f"{r['peak_mb']:>11.0f} {r['growth_mb']:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
