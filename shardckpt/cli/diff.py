"""``shardckpt diff A B``: what changed between two checkpoints.

Keys added and removed, dtype and shape changes, plain values that differ, and for every tensor
the two share: max |a - b| and the relative L2 difference ||a - b|| / ||a||, largest first; the
manager's metrics side by side. Streams: one tensor of each checkpoint is in memory at a time,
and the arithmetic runs over slices so the float64 copies stay small.
"""

from __future__ import annotations

import math

import torch

from ..load import ReadPlan
from ..format.opening import open_for_read
from . import common
from .output import Output, human_number

HELP = "compare two checkpoints tensor by tensor"
SLICE = 1 << 22  # elements per float64 slice of the comparison


def register(sub, parent) -> None:
    """Add the ``diff`` subcommand."""
    p = sub.add_parser("diff", parents=[parent], help=HELP, description=HELP + ".")
    p.add_argument("a", help="the first (reference) checkpoint")
    p.add_argument("b", help="the second checkpoint")
    p.add_argument("--limit", type=int, default=30,
                   help="tensors shown in the table (0: all; --json always has all)")
    # like diff(1): 1 means "they differ", so a failure to compare needs its own status
    p.set_defaults(func=run, error_status=2)


def load_tensor(m, paths, key: str) -> torch.Tensor:
    """Tensor ``key`` of a checkpoint, whole, on the CPU (reads only its chunks)."""
    entry = m.tensors[key]
    t = torch.empty(entry.shape, dtype=entry.dtype.torch)
    plan = ReadPlan(m)
    plan.into(key, t)
    plan.run(paths)
    return t


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """``max_abs`` |a - b|, ``rel_l2`` ||a - b|| / ||a|| (inf when a is 0 and b is not) and
    ``equal`` (bitwise) of two tensors of one shape, computed in float64 (complex128)."""
    wide = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    fa, fb = a.reshape(-1), b.reshape(-1)
    max_abs, diff_sq, ref_sq = 0.0, 0.0, 0.0
    for i in range(0, fa.numel(), SLICE):
        x, y = fa[i:i + SLICE].to(wide), fb[i:i + SLICE].to(wide)
        d = (x - y).abs()
        max_abs = max(max_abs, d.max().item()) if d.numel() else max_abs
        if d.isnan().any():
            max_abs = math.nan
        diff_sq += float(d.square().sum())
        ref_sq += float(x.abs().square().sum())
    diff, ref = math.sqrt(diff_sq), math.sqrt(ref_sq)
    rel = diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
    # bitwise, so that NaNs in the same places with the same payload count as equal
    same = a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8),
                                              b.reshape(-1).view(torch.uint8))
    return {"max_abs": max_abs, "rel_l2": rel if not math.isnan(max_abs) else math.nan,
            "equal": same}


def _change(row: dict) -> tuple:
    """Sort key: biggest change first; NaN counts as the biggest."""
    def big(v):
        return math.inf if math.isnan(v) else v
    return (-big(row["rel_l2"]), -big(row["max_abs"]), row["key"])


def _values(va: dict, vb: dict) -> list[dict]:
    return [{"path": k, "a": va.get(k), "b": vb.get(k), "in": "both" if k in va and k in vb
             else "a" if k in va else "b"} for k in sorted(set(va) | set(vb))
            if va.get(k, KeyError) != vb.get(k, KeyError) or (k in va) != (k in vb)]


def _metrics(ma, mb) -> list[dict]:
    a = common.manager_info(ma).get("metrics") or {}
    b = common.manager_info(mb).get("metrics") or {}
    return [{"name": k, "a": a.get(k), "b": b.get(k)} for k in sorted(set(a) | set(b))]


def collect(args, progress=None) -> dict:
    """The ``--json`` document of ``diff``; ``progress(bytes)`` after each tensor pair."""
    options = common.options_of(args)
    ma, pa = open_for_read(args.a, options)
    mb, pb = open_for_read(args.b, options)
    common_keys = [k for k in ma.tensors if k in mb.tensors]
    layout, tensors = [], []
    for key in common_keys:
        ea, eb = ma.tensors[key], mb.tensors[key]
        if ea.dtype != eb.dtype or ea.shape != eb.shape:
            layout.append({"key": key, "a": {"dtype": ea.dtype.name, "shape": list(ea.shape)},
                           "b": {"dtype": eb.dtype.name, "shape": list(eb.shape)}})
        if ea.shape == eb.shape:
            row = compare(load_tensor(ma, pa, key), load_tensor(mb, pb, key))
            tensors.append({"key": key, "dtype": ea.dtype.name, **row})
        if progress:
            progress(common.entry_bytes(ea)[0])
    tensors.sort(key=_change)
    doc = {"a": args.a, "b": args.b, "equal": False,
           "added": sorted(k for k in mb.tensors if k not in ma.tensors),
           "removed": sorted(k for k in ma.tensors if k not in mb.tensors),
           "changed_layout": layout, "tensors": tensors,
           "values": _values(common.plain_values(ma.tree), common.plain_values(mb.tree)),
           "metrics": _metrics(ma, mb),
           "steps": [common.manager_info(ma).get("step"), common.manager_info(mb).get("step")]}
    doc["equal"] = is_equal(doc)
    return doc


def is_equal(doc: dict) -> bool:
    """Whether a diff document found the two checkpoints' contents the same: the same keys,
    dtypes and shapes, every tensor bitwise equal and the same plain values. The manager's
    metrics and other metadata are shown, not compared (two saves of one state are equal)."""
    return not (doc["added"] or doc["removed"] or doc["changed_layout"] or doc["values"]
                or not all(t["equal"] for t in doc["tensors"]))


def run(args, out: Output) -> int:
    """Compare; like diff(1), exit 0 when the contents are equal (``is_equal``), 1 when they
    differ (2 through the caller when one cannot be read)."""
    ma = common.read_manifest(args.a, common.options_of(args))
    total = sum(common.entry_bytes(e)[0] for e in ma.tensors.values())
    with out.progress("comparing", total) as advance:
        doc = collect(args, advance)
    status = 0 if doc["equal"] else 1
    if out.as_json:
        out.json(doc)
        return status
    _render(doc, out, args.limit)
    out.line("equal" if doc["equal"] else "differ")
    return status


def _render(doc: dict, out: Output, limit: int) -> None:
    same = sum(1 for t in doc["tensors"] if t["equal"])
    out.line(f"A {doc['a']}  B {doc['b']}: {len(doc['added'])} added, {len(doc['removed'])} "
             f"removed, {len(doc['changed_layout'])} dtype/shape changed, "
             f"{len(doc['tensors']) - same} of {len(doc['tensors'])} common tensors differ")
    for what in ("added", "removed"):
        for key in doc[what]:
            out.line(f"  {what}: {key}")
    for c in doc["changed_layout"]:
        out.line(f"  changed: {c['key']}: {c['a']['dtype']}{c['a']['shape']} -> "
                 f"{c['b']['dtype']}{c['b']['shape']}")
    shown = doc["tensors"] if limit <= 0 else doc["tensors"][:limit]
    if shown:
        out.table(["tensor", "dtype", "max |a-b|", "rel L2", ""],
                  [[t["key"], t["dtype"], human_number(t["max_abs"]), human_number(t["rel_l2"]),
                    "=" if t["equal"] else ""] for t in shown])
    if len(shown) < len(doc["tensors"]):
        out.line(f"  ... {len(doc['tensors']) - len(shown)} more (--limit 0 or --json)")
    if doc["values"]:
        out.table(["value", "A", "B"], [[v["path"], "-" if v["in"] == "b" else repr(v["a"]),
                                         "-" if v["in"] == "a" else repr(v["b"])]
                                        for v in doc["values"]])
    if doc["metrics"]:
        out.table(["metric", f"A (step {doc['steps'][0]})", f"B (step {doc['steps'][1]})"],
                  [[r["name"], human_number(r["a"]), human_number(r["b"])]
                   for r in doc["metrics"]])
