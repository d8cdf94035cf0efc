"""Coordination cost of a distributed save, simulated for many ranks in one process.

Usage:
    python scripts/bench_coordination.py [--ranks 1024,4096,16384] [--tensors 500]

Each simulated rank holds a Shard(0) piece of every tensor (uneven sizes), a few replicated plain
tensors and a per-rank data position, described as ``plan.local_plan`` does it. Timed, as the coordinator (rank 0)
does it: parsing every rank's JSON plan, ``merge_plans`` (replica dedup, write assignment),
parsing every rank's JSON write report, ``build_manifest`` and serializing it, and writing it
with fsync. Not timed: what each rank does for itself in parallel (its own plan and report),
reported per rank. Memory: the process's resident set when the timed part starts (the ranks'
plan and report texts, which the coordinator must receive) and its peak during it (Linux
VmHWM, reset first); each size gets its own process so that sizes do not share peaks. The target (issue: distributed save) is <= 2 s at 4096 ranks x 500 tensors;
DCP's plan validation is quadratic (pytorch#163548: > 200 s at 1024 ranks x 1024 tensors).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import numpy as np  # noqa: E402

from shardckpt import manifest as manifest_mod, tables  # noqa: E402
from shardckpt.merge import build_manifest, merge_plans  # noqa: E402
from shardckpt.tree import split_values  # noqa: E402

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


def rank_plan(rank: int, ranks: int, tensors: int) -> dict:
    """What ``plan.local_plan`` sends for this rank (built with its own helpers): the layout,
    the tree's skeleton and values (the data position differs per rank), boxes, checksums."""
    layout, skeleton, values, at, rows, crc = _common(ranks, tensors)
    values = values[:at] + [{"int": 1000 + rank}] + values[at + 1:]
    per, extra = np.divmod(rows, ranks)
    boxes = np.zeros((tensors, 4), np.int64)
    sharded = rows >= 0
    boxes[sharded, 0] = rank * per[sharded] + np.minimum(rank, extra[sharded])
    boxes[sharded, 2] = per[sharded] + (rank < extra[sharded])
    boxes[sharded, 3] = 512
    boxes[~sharded, 2] = 4096
    return {"layout": layout, "skeleton": skeleton, "values": tables.pack_text(values),
            "width": 2, "boxes": tables.encode(boxes), "crc": crc}


def rank_report(rank: int, plan: dict, assigned: np.ndarray) -> dict:
    """What ``saver.write_rank`` sends back: one chunk per assigned piece, in one file."""
    box = tables.decode(plan["boxes"], 4, "plan")[assigned]
    count = box[:, 2] * np.where(box[:, 3] > 0, box[:, 3], 1)
    length = count * np.where(box[:, 3] > 0, 2, 4)  # bf16 pieces are 2-D, fp32 ones 1-D
    offset = 16 + np.cumsum(length) - length
    n = len(assigned)
    chunks = np.column_stack([np.zeros(n, np.int64), offset, length, np.zeros(n, np.int64),
                              count, np.zeros(n, np.int64), np.full(n, 0xDEADBEEF, np.int64)])
    pieces = np.column_stack([assigned, np.ones(n, np.int64)])
    size = int(16 + length.sum())
    return {"files": [{"path": f"data/rank-{rank:05d}.bin", "size": size}], "codecs": [[]],
            "pieces": tables.encode(pieces), "chunks": tables.encode(chunks.reshape(-1, 7)),
            "raw_bytes": size - 16}


def _memory() -> dict:
    """This process's resident and peak resident memory, in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _reset_peak() -> None:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def simulate(ranks: int, tensors: int, workdir: str) -> dict:
    t0 = time.perf_counter()
    plan_texts = [json.dumps(rank_plan(r, ranks, tensors)) for r in range(ranks)]
    per_rank_plan = (time.perf_counter() - t0) / ranks

    _reset_peak()
    before = _memory()["VmRSS"]
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
    peak = _memory()["VmHWM"]
    os.unlink(path)
    return {"ranks": ranks, "tensors": tensors, "pieces": ranks * tensors,
            "plan_s": t_plan, "commit_s": t_commit, "total_s": t_plan + t_commit,
            "manifest_mb": len(manifest) / 1e6, "per_rank_plan_ms": per_rank_plan * 1e3,
            "inputs_mb": before / 1e6, "peak_mb": peak / 1e6, "growth_mb": (peak - before) / 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1024,4096,16384")
    p.add_argument("--tensors", type=int, default=500)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one size, as JSON (internal)
    args = p.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(simulate(args.one, args.tensors, workdir)))
        return 0
    print(f"{'ranks':>6} {'tensors':>7} {'pieces':>9} {'merge s':>8} {'commit s':>9} "
          f"{'total s':>8} {'manifest MB':>11} {'ns/piece':>9} {'RSS before MB':>13} "
          f"{'peak RSS MB':>11} {'growth MB':>9}")
    for ranks in (int(r) for r in args.ranks.split(",")):
        run = subprocess.run([sys.executable, __file__, "--one", str(ranks), "--tensors",
                              str(args.tensors)], capture_output=True, text=True)
        if run.returncode:
            print(f"{ranks:>6} failed: {run.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{r['ranks']:>6} {r['tensors']:>7} {r['pieces']:>9} {r['plan_s']:>8.2f} "
              f"{r['commit_s']:>9.2f} {r['total_s']:>8.2f} {r['manifest_mb']:>11.1f} "
              f"{r['total_s'] / r['pieces'] * 1e9:>9.0f} {r['inputs_mb']:>13.0f} "
              f"{r['peak_mb']:>11.0f} {r['growth_mb']:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
