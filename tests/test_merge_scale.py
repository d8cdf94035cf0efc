"""The coordinator's merge and manifest stay linear at many simulated ranks (cheap in CI).

Plans are built as ``plan.local_plan`` lays them out, for ranks that each hold a Shard(0) piece
of every tensor plus two replicated plain tensors; the merged manifest must parse and validate.
Timing is compared within one run (per-piece cost at 2048 ranks against 256 ranks) with a
generous bound: linear work gives about 1x, the quadratic plan validation DCP has gives ~8x.
"""

import json
import time

import numpy as np

from shardckpt import manifest as manifest_mod, tables
from shardckpt.merge import build_manifest, merge_plans
from shardckpt.tree import split_values

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
