"""The coordinator's merge of every rank's plan, and the manifest built from their reports.

Work is linear in ranks x tensors and vectorized: ranks with the same tensor layout or tree
skeleton (the usual case) share one parsed copy, pieces are numpy rows, replicas are found by
sorting 64-bit fingerprints of their boxes (checked exactly), and only pieces held by several
ranks are assigned one at a time (to the least-loaded holder). With chunk indexes (FORMAT.md
3.7) DTensors on a plain grid never become rows: ranks with the same plan texts form a group,
each rule's cells are assigned by arithmetic per mesh (grid.py), and the manifest lists files,
not chunks. ``scripts/bench/coordination.py`` measures it up to 65536 ranks x 500 tensors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from ..format import grid, tables
from . import incremental
from ..errors import CorruptCheckpointError, UnsupportedValueError
from ..format.tree import fill_values, with_overrides
from ..types import DTYPES, FileEntry, IndexEntry, Manifest, TensorEntry, TensorLayout


@dataclass
class GlobalPlan:
    """What the coordinator decided and needs again to build the manifest."""

    keys: list[str] = field(default_factory=list)       # tensor table, by key id
    dtypes: list[str] = field(default_factory=list)
    shapes: list[tuple] = field(default_factory=list)
    width: int = 0                                       # box columns: offsets, then shapes
    assign: dict[int, np.ndarray] = field(default_factory=dict)  # rank -> item indices to write
    kids: dict[int, np.ndarray] = field(default_factory=dict)    # rank -> key id of each item
    layout_kids: dict[int, np.ndarray] = field(default_factory=dict)  # ... before renames
    layouts: dict[int, list] = field(default_factory=dict)  # rank -> [key, dtype, shape, dt]
    boxes: dict[int, np.ndarray] = field(default_factory=dict)   # rank -> (items, 2 * width)
    # With chunk indexes (FORMAT.md 3.7): rank -> [item, tensor, shard] rows it writes, and
    # the manifest's tensors in order.
    answers: dict[int, dict] = field(default_factory=dict)  # target_rows() reads one
    templates: list[str] = field(default_factory=list)     # rule rows shared by many ranks
    tensor_layouts: dict[str, TensorLayout] = field(default_factory=dict)
    indexed: bool = False


class _Keys:
    """The tensor table: key -> id with dtype, global shape and kind."""

    def __init__(self, gp: GlobalPlan):
        self.gp, self.ids, self.dtensor, self.clash = gp, {}, [], set()

    def add(self, key: str, dtype: str, shape, dtensor: bool) -> int:
        kid = self.ids.get(key)
        if kid is None:
            kid = self.ids[key] = len(self.gp.keys)
            self.gp.keys.append(key)
            self.gp.dtypes.append(dtype)
            self.gp.shapes.append(tuple(shape))
            self.dtensor.append(dtensor)
        elif (self.gp.dtypes[kid], self.gp.shapes[kid], self.dtensor[kid]) != \
                (dtype, tuple(shape), dtensor):
            if dtensor or self.dtensor[kid]:
                raise UnsupportedValueError(f"{key}: ranks disagree on this DTensor's dtype, "
                                            "shape or kind")
            self.clash.add(kid)  # plain tensors of different shapes: per-rank values
        return kid


def _pieces(plans: dict[int, dict], keys: _Keys, rules: grid.Rules):
    """Every explicit piece as parallel arrays: rank, item, key id, box row, replica checksum.
    Pieces under a grid rule the whole mesh agrees on are left to ``rules`` (no row each)."""
    parsed: dict[str, tuple] = {}
    decoded: dict[str, np.ndarray] = {}  # ranks often send the same table text (replicas)
    ranks, items, kids, boxes, crcs = [], [], [], [], []
    width = max(p["width"] for p in plans.values())
    for rank, p in sorted(plans.items()):
        if p["layout"] not in parsed:
            layout = tables.unpack_text(p["layout"], f"rank {rank} plan")
            parsed[p["layout"]] = (np.array([keys.add(*row) for row in layout], np.int64),
                                   layout)
        kid, keys.gp.layouts[rank] = parsed[p["layout"]]
        explicit, fallback = rules.explicit(rank, p, kid)
        box = (_decoded(decoded, p["boxes"], 2 * p["width"], rank) if p["width"]
               else np.zeros((len(explicit), 0), np.int64))
        if p["width"] < width:  # pad offsets and shapes separately to the common width
            pad = np.zeros((len(box), width - p["width"]), np.int64)
            box = np.hstack([box[:, :p["width"]], pad, box[:, p["width"]:], pad])
        if len(box) != len(explicit):
            raise CorruptCheckpointError(f"rank {rank} plan: {len(box)} boxes for "
                                         f"{len(explicit)} pieces")
        if fallback:  # rule pieces the mesh does not agree on: boxes from the rule
            explicit, box = rules.with_fallback(rank, explicit, box, fallback, width)
        crc = _decoded(decoded, p["crc"], 1, rank)[:, 0]
        ranks.append(np.full(len(explicit), rank, np.int64))
        items.append(explicit)
        kids.append(kid[explicit])
        boxes.append(box)
        crcs.append(crc[explicit])
        keys.gp.layout_kids[rank], keys.gp.kids[rank], keys.gp.boxes[rank] = kid, kid, box
    cat = (lambda a: np.concatenate(a)) if ranks else (lambda a: np.zeros(0, np.int64))
    return (cat(ranks), cat(items), cat(kids),
            np.concatenate(boxes) if boxes else np.zeros((0, 2 * width), np.int64),
            cat(crcs), width)


def _decoded(cache: dict, text: str, columns: int, rank: int) -> np.ndarray:
    """``tables.decode`` once per distinct text (the arrays are only read)."""
    if (text, columns) not in cache:
        cache[text, columns] = tables.decode(text, columns, f"rank {rank} plan")
    return cache[text, columns]


def _fingerprint(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row (wrapping multiply-add); equal rows give equal fingerprints."""
    h = np.zeros(len(rows), np.uint64)
    with np.errstate(over="ignore"):
        for col in rows.T.astype(np.uint64):
            h = (h ^ col) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
    return h


def _groups(rows: np.ndarray):
    """``(order, starts)``: rows sorted so that equal rows are adjacent, and where each run of
    equal rows begins. Fingerprints do the sorting; equality is then checked exactly."""
    fp = _fingerprint(rows)
    order = np.argsort(fp)
    srt, fp = rows[order], fp[order]
    new = np.ones(len(srt), bool)
    new[1:] = np.any(srt[1:] != srt[:-1], axis=1)
    if (new[1:] & (fp[1:] == fp[:-1])).any():  # a hash collision split a run: sort exactly
        order = np.lexsort(rows.T[::-1])
        srt = rows[order]
        new[1:] = np.any(srt[1:] != srt[:-1], axis=1)
    return order, np.flatnonzero(new)


# The fields of a rank's plan that merge_plans reads; the tree's skeleton and values are only
# read when the manifest is built.
_MERGE_FIELDS = ("layout", "width", "boxes", "crc", "grid")
_last_merge: tuple = (None, None)


def merged(plans: dict[int, dict], indexed: bool = False) -> GlobalPlan:
    """``merge_plans``, reusing the previous call's result when every rank sent the same pieces:
    a training job saves the same layout again and again. A GlobalPlan is only read after the
    merge, so sharing it is safe."""
    global _last_merge
    key = (indexed, tuple((r, *(p.get(f) for f in _MERGE_FIELDS))
                          for r, p in sorted(plans.items())))
    last_key, gp = _last_merge
    if last_key != key:
        gp = merge_plans(plans, indexed)
        _last_merge = (key, gp)
    return gp


def merge_plans(plans: dict[int, dict], indexed: bool = False) -> GlobalPlan:
    """Assign each distinct piece to exactly one holder.

    A DTensor piece held by several ranks (a replica) and a plain tensor whose copies agree are
    written once, by the least-loaded holder. Plain tensors whose copies differ (per-rank RNG)
    are written by every holder under ``<key>@rank<r>`` (tree overrides point there).
    Cells of a grid rule (grid.py) are assigned by arithmetic per mesh. With ``indexed`` (the
    ranks write chunk index files, FORMAT.md 3.7) the plan also fixes every written piece's
    tensor and shard number, and the manifest's tensor layouts (``gp.answers``,
    ``gp.templates``, ``gp.tensor_layouts``).
    """
    gp = GlobalPlan(indexed=indexed)
    keys = _Keys(gp)
    rules = grid.Rules(plans, keys)
    rank, item, kid, box, crc, gp.width = _pieces(plans, keys, rules)
    dtensor = np.array(keys.dtensor, bool)[kid] if len(kid) else np.zeros(0, bool)
    itemsize = np.array([DTYPES[d].itemsize for d in gp.dtypes], np.int64)
    nbytes = np.prod(box[:, gp.width:], axis=1) * itemsize[kid] if len(kid) else kid
    # Plain tensors whose copies differ become per-rank keys.
    plain = ~dtensor
    order, starts = _groups(np.stack([kid[plain], crc[plain]], axis=1))
    kids_plain = kid[plain][order]
    per_key_runs = np.bincount(kids_plain[starts], minlength=len(gp.keys))
    differ = (per_key_runs > 1) | np.isin(np.arange(len(gp.keys)), list(keys.clash))
    own = plain & differ[kid]
    for r, i, k in zip(rank[own], item[own], kid[own]):
        _, dtype, shape, _ = gp.layouts[int(r)][i]  # this rank's own dtype and shape
        new = keys.add(f"{gp.keys[k]}@rank{r}", dtype, shape, False)
        if gp.kids[int(r)] is gp.layout_kids[int(r)]:  # shared by ranks of one layout
            gp.kids[int(r)] = gp.kids[int(r)].copy()
        gp.kids[int(r)][i] = new
    # Everything else: group identical (key, box) pieces; single holders are forced.
    shared = ~own
    rows = np.concatenate([kid[shared, None], box[shared]], axis=1)
    order, starts = _groups(rows)
    holders = np.diff(np.append(starts, len(order)))
    idx = np.flatnonzero(shared)[order]
    single = holders == 1
    pick = [idx[starts[single]]]
    load = np.bincount(rank[pick[0]], weights=nbytes[pick[0]], minlength=max(plans) + 1)
    multi = np.flatnonzero(~single)
    for g in multi[np.argsort(-nbytes[idx[starts[multi]]], kind="stable")]:
        members = idx[starts[g]:starts[g] + holders[g]]
        best = members[np.argmin(load[rank[members]])]
        load[rank[best]] += nbytes[best]
        pick.append(np.array([best]))
    mask = own.copy()
    mask[np.concatenate(pick)] = True
    chosen = np.flatnonzero(mask)  # already in (rank, item) order: no sort
    bounds = np.searchsorted(rank[chosen], np.arange(len(load) + 1))
    by_rule = rules.assignments()
    if not indexed:
        if by_rule:
            raise UnsupportedValueError("grid rules need a save that writes chunk indexes")
        for r in plans:
            gp.assign[r] = item[chosen[bounds[r]:bounds[r + 1]]]
        return gp
    final = kid.copy()
    final[own] = [gp.kids[int(r)][i] for r, i in zip(rank[own], item[own])]
    _index_targets(gp, plans, rules.splits(), by_rule, chosen, bounds, item, final,
                   np.concatenate([box, rank[:, None]], axis=1))
    return gp


def _index_targets(gp: GlobalPlan, plans, splits: dict, by_rule: dict, chosen, bounds, item,
                   final, box) -> None:
    """The tensor order of the manifest, each tensor's layout, and for every rank what it
    writes: ``gp.answers`` (read by ``target_rows``) with ``gp.templates``, the rule rows that
    ranks of one group share, encoded once instead of once per rank. ``box``
    rows end with the piece's rank: an explicit layout records each shard's writer."""
    kid = final[chosen]
    order = _stable_order(kid)
    runs = np.searchsorted(kid[order], np.arange(len(gp.keys) + 1))
    shard = np.empty(len(kid), np.int64)
    shard[order] = np.arange(len(kid)) - runs[kid[order]]
    has = np.diff(runs) > 0
    has[list(splits)] = True
    tid = np.cumsum(has) - 1
    w, srt = gp.width, box[chosen][order]
    for k in np.flatnonzero(has).tolist():
        dtype, shape = DTYPES[gp.dtypes[k]], gp.shapes[k]
        if k in splits:
            gp.tensor_layouts[gp.keys[k]] = TensorLayout(dtype, shape, splits=splits[k])
        else:
            b, nd = srt[runs[k]:runs[k + 1]], len(shape)
            gp.tensor_layouts[gp.keys[k]] = TensorLayout(
                dtype, shape, boxes=np.concatenate([b[:, :nd], b[:, w:w + nd], b[:, -1:]],
                                                   axis=1))
    templates: dict[int, int] = {}  # rule items arrays are shared by the ranks of a group
    empty = tables.encode(np.zeros((0, 3), np.int64))
    for r in plans:
        lo, hi = bounds[r], bounds[r + 1]
        at = chosen[lo:hi]
        rows = empty if lo == hi else tables.encode(  # most ranks write only rule pieces
            np.stack([item[at], tid[final[at]], shard[lo:hi]], axis=1))
        rules = []
        for items, cell in by_rule.get(r, ()):
            if id(items) not in templates:
                templates[id(items)] = len(gp.templates)
                gp.templates.append(tables.encode(np.stack(
                    [items, tid[gp.layout_kids[r][items]]], axis=1)))
            rules.append([templates[id(items)], cell])
        gp.answers[r] = {"rows": rows, "rules": rules}


def target_rows(common: dict, mine: dict, cache: dict | None = None) -> np.ndarray:
    """The ``[item, tensor, shard]`` rows a rank writes, from the plan round's answer:
    its explicit rows, and for each rule template it follows, the template's
    ``[item, tensor]`` rows with its cell as the shard."""
    cache = {} if cache is None else cache
    parts = [tables.decode(mine["rows"], 3, "assignment")]
    for t, cell in mine["rules"]:
        if t not in cache:
            cache[t] = tables.decode(common["templates"][t], 2, "assignment")
        part = np.empty((len(cache[t]), 3), np.int64)
        part[:, :2], part[:, 2] = cache[t], cell
        parts.append(part)
    return np.concatenate(parts)


def rank_trees(plans: dict[int, dict], gp: GlobalPlan) -> tuple[dict, list]:
    """``(tree, overrides)``: saving rank 0's tree, and ``[rank, [[path, node], ...]]`` for
    every rank whose values, skeleton or per-rank tensors differ from it (FORMAT.md 3.5).
    Ranks sharing rank 0's skeleton cost a comparison of their values' text."""
    paths: dict[str, tuple] = {}

    def unpack(r, field):
        return tables.unpack_text(plans[r][field], f"rank {r} plan")

    def skeleton_paths(r):
        if plans[r]["skeleton"] not in paths:
            paths[plans[r]["skeleton"]] = fill_values(unpack(r, "skeleton"), None)[1:]
        return paths[plans[r]["skeleton"]]
    base_skeleton, base_text = plans[0]["skeleton"], plans[0]["values"]
    base_values = unpack(0, "values")
    tree = fill_values(unpack(0, "skeleton"), base_values)[0]
    overrides = []
    for r in sorted(plans):
        own, p = [], plans[r]
        if r and p["skeleton"] != base_skeleton:
            own.append([[], fill_values(unpack(r, "skeleton"), unpack(r, "values"))[0]])
        elif r and p["values"] != base_text:
            value_paths = skeleton_paths(r)[0]
            own += [[value_paths[i], v] for i, v in enumerate(unpack(r, "values"))
                    if v != base_values[i]]
        renamed = (() if gp.kids[r] is gp.layout_kids[r]  # nothing renamed: not copied
                   else np.flatnonzero(gp.layout_kids[r] != gp.kids[r]))
        if len(renamed):
            _, tensor_paths, kinds = skeleton_paths(r)
            own += [[tensor_paths[gp.keys[gp.layout_kids[r][i]]],
                     {kinds[gp.keys[gp.layout_kids[r][i]]]: gp.keys[gp.kids[r][i]]}]
                    for i in renamed]
        if r == 0:
            tree = with_overrides(tree, own)  # rank 0's own per-rank tensors
        elif own:
            overrides.append([r, own])
    return tree, overrides


def build_manifest(gp: GlobalPlan, plans: dict[int, dict], results: dict[int, dict],
                   metadata: dict) -> Manifest:
    """The global manifest from every rank's report (files, codecs, pieces, chunk rows; or
    with chunk indexes, files and the index file alone)."""
    if gp.indexed:
        return _indexed_manifest(gp, plans, results, metadata)
    chains, chain_ids = [], {}
    files, first, ref_index = incremental.file_entries(results)  # references: FORMAT.md 3.6
    hashed = all("hashes" in res for res in results.values())
    piece_kid, piece_box, piece_count, chunk_rows = [], [], [], []
    for rank in sorted(results):
        res = results[rank]
        remap = np.array([chain_ids.setdefault(json.dumps(c), len(chain_ids)) for c in
                          res["codecs"]] or [0], np.int64)
        pieces = tables.decode(res["pieces"], 2, f"rank {rank} report")
        rows = tables.decode(res["chunks"], 7, f"rank {rank} report")
        incremental.place_rows(rows, first[rank], ref_index[rank])
        rows[:, 5] = remap[rows[:, 5]]
        if hashed:  # two more columns that travel with their rows, split off below
            rows = np.hstack([rows, tables.decode(res["hashes"], 2, f"rank {rank} report")])
        piece_kid.append(gp.kids[rank][pieces[:, 0]])
        piece_box.append(gp.boxes[rank][pieces[:, 0]])
        piece_count.append(pieces[:, 1])
        chunk_rows.append(rows)
    chains = [tuple(json.loads(c)) for c in chain_ids]
    tensors = _tensor_entries(gp, np.concatenate(piece_kid), np.concatenate(piece_box),
                              np.concatenate(piece_count), np.concatenate(chunk_rows))
    tensors, hashes = incremental.split_hashes(tensors, hashed)
    tree, overrides = rank_trees(plans, gp)
    return Manifest(world_size=len(plans), files=tuple(files), codecs=tuple(chains),
                    tensors=tensors, tree=tree, metadata=metadata, created_unix=time.time(),
                    rank_overrides=tuple(overrides) or None, hashes=hashes)


def _indexed_manifest(gp: GlobalPlan, plans, results, metadata: dict) -> Manifest:
    """A revision 1.4 manifest (FORMAT.md 3.7): the layouts fixed by the plan, every rank's
    data files and its index file; no chunk row passes through here."""
    files, indexes = [], []
    for rank in sorted(results):
        res = results[rank]
        files += [FileEntry(f["path"], int(f["size"]), rank) for f in res["files"]]
        if res.get("index"):
            ix = res["index"]
            indexes.append(IndexEntry(ix["path"], int(ix["size"]), rank, int(ix["crc32c"])))
    tree, overrides = rank_trees(plans, gp)
    return Manifest(world_size=len(plans), files=tuple(files), codecs=(),
                    tensors=dict(gp.tensor_layouts), tree=tree, metadata=metadata,
                    created_unix=time.time(), rank_overrides=tuple(overrides) or None,
                    indexes=tuple(indexes))


def _stable_order(values: np.ndarray) -> np.ndarray:
    """A stable argsort; small non-negative ids take numpy's linear-time radix sort."""
    if len(values) and values.max() < 1 << 16:
        return np.argsort(values.astype(np.uint16), kind="stable")
    return np.argsort(values, kind="stable")


def _tensor_entries(gp: GlobalPlan, kid, box, count, rows) -> dict[str, TensorEntry]:
    """Per key: its pieces' boxes, chunk counts and chunk rows, by a stable sort on key id."""
    first = np.concatenate([[0], np.cumsum(count)])
    order = _stable_order(kid)
    # Chunk rows follow their pieces: gather each piece's run of rows in the new order.
    run_start = np.repeat(first[:-1][order], count[order])
    within = np.arange(len(run_start)) - np.repeat(np.cumsum(count[order]) - count[order],
                                                   count[order])
    rows = rows[run_start + within]
    kid, box, count = kid[order], box[order], count[order]
    piece_at = np.searchsorted(kid, np.arange(len(gp.keys) + 1))
    chunk_at = np.concatenate([[0], np.cumsum(count)])[piece_at]
    out, w = {}, gp.width
    for k, key in enumerate(gp.keys):
        if piece_at[k] == piece_at[k + 1]:
            continue  # every copy went to <key>@rank<r>
        nd = len(gp.shapes[k])
        b = box[piece_at[k]:piece_at[k + 1]]
        out[key] = TensorEntry(DTYPES[gp.dtypes[k]], gp.shapes[k],
                               np.concatenate([b[:, :nd], b[:, w:w + nd]], axis=1),
                               count[piece_at[k]:piece_at[k + 1]].copy(),
                               rows[chunk_at[k]:chunk_at[k + 1]])
    return out
