"""The coordinator's merge and manifest stay linear at many simulated ranks (cheap in CI).

Plans are built as ``plan.local_plan`` lays them out, for ranks that each hold a Shard(0) piece
of every tensor plus two replicated plain tensors; the merged manifest must parse and validate.
Timing is compared within one run (per-piece cost at 2048 ranks against 256 ranks) with a
generous bound: linear work gives about 1x, the quadratic plan validation DCP has gives ~8x.
"""

import json
import time

import numpy as np

from shardckpt.format import grid, manifest as manifest_mod, tables
from shardckpt.save.merge import build_manifest, merge_plans, target_rows
from shardckpt.format.tree import split_values

TENSORS = 16


def _plans(ranks: int) -> dict:
    layout = [[f"t{t}", "float32", [4096] if t < 2 else [ranks * 2 + t, 8], t >= 2]
              for t in range(TENSORS)]
    tree = {"dict": [[f"t{t}", {"tensor": f"t{t}"}] for t in range(TENSORS)]}
    skeleton, values = split_values(tree)
    common = {"layout": tables.pack_text(layout), "skeleton": tables.pack_text(skeleton),
              "values": tables.pack_text(values), "width": 2,
              "crc": tables.encode(np.array([7, 8] + [-1] * (TENSORS - 2), np.int64))}
    plans = {}
    for r in range(ranks):
        boxes = np.zeros((TENSORS, 4), np.int64)
        boxes[:2, 2] = 4096
        rows = np.array([ranks * 2 + t for t in range(2, TENSORS)])
        per, extra = np.divmod(rows, ranks)
        boxes[2:, 0] = r * per + np.minimum(r, extra)
        boxes[2:, 2], boxes[2:, 3] = per + (r < extra), 8
        plans[r] = json.loads(json.dumps(dict(common, boxes=tables.encode(boxes))))
    return plans


def _coordinate(ranks: int):
    plans = _plans(ranks)
    t0 = time.perf_counter()
    gp = merge_plans(plans)
    results = {}
    for r, assigned in gp.assign.items():
        box = gp.boxes[r][assigned]
        count = box[:, 2] * np.where(box[:, 3] > 0, box[:, 3], 1)
        offset = 16 + np.cumsum(count * 4) - count * 4
        n = len(assigned)
        chunks = np.column_stack([np.zeros(n, np.int64), offset, count * 4,
                                  np.zeros(n, np.int64), count, np.zeros(n, np.int64),
                                  np.zeros(n, np.int64)]).reshape(-1, 7)
        results[r] = {"files": [{"path": f"data/rank-{r:05d}.bin",
                                 "size": int(16 + (count * 4).sum())}], "codecs": [[]],
                      "pieces": tables.encode(np.column_stack([assigned, np.ones(n, np.int64)])),
                      "chunks": tables.encode(chunks)}
    data = manifest_mod.to_json(build_manifest(gp, plans, results, {}))
    return time.perf_counter() - t0, data


def test_large_simulated_world_merges_into_a_valid_manifest():
    _, data = _coordinate(2048)
    m = manifest_mod.parse(data)  # every rule of FORMAT.md checked
    assert len(m.files) == 2048
    assert len(m.tensors["t0"].boxes) == 1  # a replica is written once
    assert len(m.tensors["t5"].boxes) == 2048


def test_per_piece_cost_stays_flat_from_256_to_2048_ranks():
    small = min(_coordinate(256)[0] for _ in range(3)) / (256 * TENSORS)
    large = min(_coordinate(2048)[0] for _ in range(2)) / (2048 * TENSORS)
    assert large < 5 * small, (large * 1e9, small * 1e9)


# --- revision 1.4: grid rules and chunk index files (FORMAT.md 3.7) ---

def rule_plans(ranks: int, tensors: int = TENSORS, explicit_rank: int | None = None) -> dict:
    """Plans as ``plan.local_plan(rules=True)`` sends them: two replicated plain tensors, then
    DTensors ``g0, g1, ...`` of ``8 * ranks + i`` rows, Shard(0) on a mesh of every rank. Rank
    ``explicit_rank`` describes ``g1`` by an explicit box (the fallback)."""
    layout = [[f"t{t}", "float32", [4096], False] for t in range(2)]
    layout += [[f"g{i}", "float32", [8 * ranks + i, 4], True] for i in range(tensors - 2)]
    tree = {"dict": [[row[0], {"tensor": row[0]}] for row in layout]}
    skeleton, values = split_values(tree)
    rule = json.dumps([[[ranks], [0]], [[0, "chunk"]]], separators=(",", ":"))
    common = {"layout": tables.pack_text(layout), "skeleton": tables.pack_text(skeleton),
              "values": tables.pack_text(values), "width": 2,
              "crc": tables.encode(np.array([7, 8] + [-1] * (tensors - 2), np.int64))}
    ruled = list(range(2, tensors))
    plain = np.zeros((2, 4), np.int64)
    plain[:, 2] = 4096
    shared = {"grid": tables.pack_text({"rules": [rule], "items": [[i, 0] for i in ruled]}),
              "boxes": tables.encode(plain)}
    plans = {r: dict(common, **shared) for r in range(ranks)}
    if explicit_rank is not None:
        start, size = grid.cell_bounds(8 * ranks + 1, ranks, "chunk", explicit_rank)
        boxes = np.vstack([plain[:1], [[int(start), 0, int(size), 4]], plain[1:]])
        boxes[[1, 2]] = boxes[[2, 1]]  # rows by item: t0, t1, g1 (item 3)
        plans[explicit_rank] = dict(common, boxes=tables.encode(boxes), grid=tables.pack_text(
            {"rules": [rule], "items": [[i, 0] for i in ruled if i != 3]}))
    return plans


def _coordinate_indexed(ranks: int, tensors: int = TENSORS):
    plans = {r: json.loads(json.dumps(p)) for r, p in rule_plans(ranks, tensors).items()}
    t0 = time.perf_counter()
    gp = merge_plans(plans, indexed=True)
    results = {r: {"files": [{"path": f"data/rank-{r:05d}.bin", "size": 4096}],
                   "index": {"path": f"data/rank-{r:05d}.idx", "size": 200, "crc32c": r}}
               for r in gp.answers}
    m = build_manifest(gp, plans, results, {})
    manifest_mod.check_complete(m, "simulated")
    data = manifest_mod.to_json(m)
    return time.perf_counter() - t0, data, gp


def test_rules_make_the_manifest_independent_of_pieces():
    _, data, gp = _coordinate_indexed(4096, tensors=64)
    m = manifest_mod.parse(data)
    assert len(m.indexes) == 4096 and m.tensors["g3"].splits == ((0, 4096, "chunk"),)
    assert len(data) < 200 * 4096 + 20_000, len(data)  # files and indexes only: no piece rows
    common, cache = {"templates": gp.templates}, {}
    rows = [target_rows(common, a, cache) for a in gp.answers.values()]
    assert sum(len(t) for t in rows) == 4096 * 62 + 2  # each cell written once
    assert len(gp.templates) == 1  # the rule rows are shared by every rank


def test_per_piece_cost_with_rules_stays_flat_from_512_to_8192_ranks():
    small = min(_coordinate_indexed(512)[0] for _ in range(3)) / (512 * TENSORS)
    large = min(_coordinate_indexed(8192)[0] for _ in range(2)) / (8192 * TENSORS)
    assert large < 3 * small, (large * 1e9, small * 1e9)


def test_a_repeated_layout_reuses_the_merge_and_a_changed_one_does_not():
    from shardckpt.save.merge import merged
    plans = _plans(4)
    first = merged(plans)
    again = {r: dict(p, values=tables.pack_text([{"int": 5}])) for r, p in plans.items()}
    assert merged(again) is first  # only the tree's values changed: same pieces, same answer
    moved = _plans(4)
    moved[3] = dict(moved[3], crc=tables.encode(np.array([7, 9] + [-1] * (TENSORS - 2),
                                                         np.int64)))
    fresh = merged(moved)
    assert fresh is not first
    assert fresh.kids[3] is not fresh.layout_kids[3]  # rank 3's replica differs: renamed
    assert merged(plans, indexed=True) is not first
