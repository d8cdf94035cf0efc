"""Regular layouts described by rule (FORMAT.md 3.7, revision 1.4): a tensor cut into an even grid.

A DTensor whose placements are ``Shard`` and ``Replicate`` on a device mesh holds one cell of a
grid: each sharded tensor dimension is cut into as many parts as its mesh dimension has ranks
(torch.chunk's sizes), and replicas share a cell. Each rank sends that rule instead of its box;
ranks holding the same tensors under the same rule send the same text, so the coordinator compares
strings and computes who writes which cell with array arithmetic per mesh, never a row per piece.
Anything else (``_StridedShard``, ``Partial``, two mesh dimensions splitting one tensor dimension,
a piece the rule does not predict) falls back to an explicit box.
"""

from __future__ import annotations

import json
import math

import numpy as np

from . import tables
from ..errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedValueError
from ..types import MANIFEST_NAME

KINDS = ("chunk", "even")  # torch.chunk's sizes; sizes differing by at most one (divmod)
MAX_PARTS = 1 << 24


def cell_bounds(n, parts: int, kind: str, index):
    """``(start, size)`` of cell ``index`` (int or array) of a dimension of ``n`` cut into
    ``parts``: ``chunk`` gives every cell ceil(n / parts) elements until they run out, ``even``
    gives the first ``n % parts`` cells one element more than the others."""
    index = np.asarray(index, np.int64)
    if kind == "chunk":
        step = -(-n // parts)
        start = np.minimum(index * step, n)
        return start, np.minimum(start + step, n) - start
    q, r = divmod(n, parts)
    return index * q + np.minimum(index, r), q + (index < r)


def boxes(shape: tuple, splits) -> np.ndarray:
    """Every cell's box (offsets, then sizes; ``2 * ndim`` columns), row-major over ``splits``
    (``[dim, parts, kind]`` by increasing dim)."""
    nd = len(shape)
    cells = math.prod(p for _, p, _ in splits)
    out = np.zeros((cells, 2 * nd), np.int64)
    out[:, nd:] = shape
    grids = np.unravel_index(np.arange(cells), [p for _, p, _ in splits]) if splits else ()
    for (dim, parts, kind), index in zip(splits, grids):
        out[:, dim], out[:, nd + dim] = cell_bounds(shape[dim], parts, kind, index)
    return out


def check_splits(raw, shape: tuple, where: str) -> tuple:
    """A parsed ``grid`` member (FORMAT.md 3.7) as a tuple of ``(dim, parts, kind)``."""
    bad = UnsafeCheckpointError(f"{MANIFEST_NAME}: {where}: grid must be [[dim, parts, kind], "
                                f"...] with increasing dims below {len(shape)}, parts in [1, "
                                f"{MAX_PARTS}] and kind one of {KINDS}")
    if not isinstance(raw, list) or len(raw) > len(shape):
        raise bad
    out, last = [], -1
    for s in raw:
        if not (isinstance(s, list) and len(s) == 3 and all(type(v) is int for v in s[:2])
                and last < s[0] < len(shape) and 1 <= s[1] <= MAX_PARTS and s[2] in KINDS):
            raise bad
        last = s[0]
        out.append((s[0], s[1], s[2]))
    if math.prod(p for _, p, _ in out) > MAX_PARTS:
        raise bad
    return tuple(out)


# --- the rank's side: a DTensor's rule ---

def rule_of(t, offsets: tuple, local_shape: tuple):
    """The rule of DTensor ``t`` as JSON-ready ``[mesh, place]``, or None when its layout is not
    a plain grid or its piece is not the cell the rule predicts. ``mesh`` is ``[shape, ranks]``
    (``ranks`` ``[first]`` for consecutive ranks); ``place`` one ``[tensor dim, kind]`` or None
    (replicated) per mesh dimension."""
    from torch.distributed.tensor import Replicate, Shard
    mesh = t.device_mesh
    ranks = mesh.mesh.reshape(-1).tolist()
    place, dims = [], set()
    for p in t.placements:
        dim = p.dim % max(t.ndim, 1) if type(p) is Shard else None  # Shard(-1) is the last
        if dim is not None and dim not in dims:
            dims.add(dim)
            place.append([dim, "chunk"])
        elif type(p) is Replicate:
            place.append(None)
        else:
            return None
    start = ranks[0]
    mesh_json = [list(mesh.mesh.shape),
                 [start] if ranks == list(range(start, start + len(ranks))) else ranks]
    rule = [mesh_json, place]
    coord = np.unravel_index(ranks.index(_global_rank()), mesh.mesh.shape)
    box = predicted_box(rule, tuple(t.shape), coord)
    return rule if box == (tuple(offsets), tuple(local_shape)) else None


def _global_rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def splits_of(rule, shape: tuple) -> tuple:
    """The ``(dim, parts, kind)`` splits (by dim) that rule ``[mesh, place]`` cuts ``shape``
    into."""
    mesh_shape = rule[0][0]
    return tuple(sorted((p[0], mesh_shape[d], p[1]) for d, p in enumerate(rule[1]) if p))


def predicted_box(rule, shape: tuple, coord) -> tuple:
    """``(offsets, shape)`` of the cell the rank at mesh coordinate ``coord`` holds."""
    offs, sizes = [0] * len(shape), list(shape)
    for d, p in enumerate(rule[1]):
        if p:
            start, size = cell_bounds(shape[p[0]], rule[0][0][d], p[1], int(coord[d]))
            offs[p[0]], sizes[p[0]] = int(start), int(size)
    return tuple(offs), tuple(sizes)


# --- the coordinator's side: who holds and who writes each cell ---

def mesh_ranks(mesh) -> np.ndarray:
    """The global ranks of mesh ``[shape, ranks]``, in mesh order."""
    shape, ranks = mesh
    n = math.prod(shape)
    if len(ranks) == 1:
        return np.arange(ranks[0], ranks[0] + n, dtype=np.int64)
    out = np.asarray(ranks, np.int64)
    if len(out) != n:
        raise UnsafeCheckpointError(f"a plan's mesh lists {len(out)} ranks for shape {shape}")
    return out


def cells_and_replicas(rule) -> tuple[np.ndarray, np.ndarray, int]:
    """For each position of the rule's mesh: its cell (row-major over the splits by tensor dim)
    and its replica number, and how many replicas each cell has."""
    shape, place = rule[0][0], rule[1]
    coords = np.unravel_index(np.arange(math.prod(shape)), shape)
    sharded = sorted((p[0], d) for d, p in enumerate(place) if p)
    cell = np.zeros(math.prod(shape), np.int64)
    for _, d in sharded:
        cell = cell * shape[d] + coords[d]
    replica, copies = np.zeros(len(cell), np.int64), 1
    for d, p in enumerate(place):
        if p is None:
            replica, copies = replica * shape[d] + coords[d], copies * shape[d]
    return cell, replica, copies


def assign(rule, items: np.ndarray, kids: np.ndarray, ranks: list[int]) -> dict[int, tuple]:
    """``{rank: (items it writes, their cell number)}`` for ``ranks`` (of the rule's mesh) holding
    tensors ``items`` (key ids ``kids``) under ``rule``. Of a cell's replicas the one numbered
    ``(key id + cell) % copies`` writes it: every rank reaches the same choice from the key
    alone, and replicated cells spread over their holders."""
    cell, replica, copies = cells_and_replicas(rule)
    mesh = mesh_ranks(rule[0])
    where = np.argsort(mesh)
    pos = where[np.searchsorted(mesh[where], ranks)]
    out, picks = {}, {}  # (key id + cell) % copies == replica: one selection per residue
    for r, p in zip(ranks, pos.tolist()):
        f = int(replica[p] - cell[p]) % copies
        if f not in picks:
            picks[f] = items if copies == 1 else items[kids % copies == f]
        out[r] = (picks[f], int(cell[p]))
    return out


class Rules:
    """The coordinator's view of the grid rules of every rank's plan (FORMAT.md 3.7), judged
    once per distinct text; ``keys`` is the merge's tensor table (merge._Keys).

    A key stays a rule when exactly the ranks of its mesh hold it, all under the same rule text
    (they sent the same plan texts); otherwise its pieces fall back to explicit boxes computed
    from the rule, so a mixed or partial layout is still saved correctly, only slower.
    """

    def __init__(self, plans: dict[int, dict], keys):
        self.keys, self.groups, self.parsed = keys, {}, {}
        for rank, p in sorted(plans.items()):
            self.groups.setdefault((p["layout"], p.get("grid")), []).append(rank)
        holders: dict[int, dict] = {}  # key id -> rule text -> rank arrays holding it so
        explicit: set[int] = set()
        for (layout_text, text), ranks in self.groups.items():
            layout = tables.unpack_text(layout_text, f"rank {ranks[0]} plan")
            kid = np.array([keys.add(*row) for row in layout], np.int64)
            if text is None:
                explicit.update(kid.tolist())
                continue
            doc = tables.unpack_text(text, f"rank {ranks[0]} plan")
            rules = [json.loads(t) for t in doc["rules"]]
            items = np.array([i for i, _ in doc["items"]], np.int64)
            which = np.array([r for _, r in doc["items"]], np.int64)
            if len(items) and (items.min() < 0 or items.max() >= len(kid)):
                raise CorruptCheckpointError(f"rank {ranks[0]} plan: grid items out of range")
            self.parsed[text] = (rules, items, which)
            rest = np.ones(len(kid), bool)
            rest[items] = False
            explicit.update(kid[rest].tolist())
            group = len(self.parsed) - 1
            for i, w in zip(items.tolist(), which.tolist()):
                holders.setdefault(int(kid[i]), {}).setdefault(doc["rules"][w], []).append(
                    group)
        ranks_of = [np.asarray(r, np.int64) for (_, t), r in self.groups.items() if t]
        self.ruled, whole = set(), {}
        for k, by_text in holders.items():
            if k in explicit or len(by_text) != 1:
                continue
            (text, held), = by_text.items()
            if (text, tuple(held)) not in whole:  # judged once per rule and holder groups
                mesh = np.sort(mesh_ranks(json.loads(text)[0]))
                whole[text, tuple(held)] = np.array_equal(
                    np.sort(np.concatenate([ranks_of[g] for g in held])), mesh)
            if whole[text, tuple(held)]:
                self.ruled.add(k)
        self._explicit: dict = {}

    def explicit(self, rank: int, plan: dict, kid: np.ndarray) -> tuple[np.ndarray, list]:
        """This rank's items that have a box row, and its rule items that fall back."""
        if "grid" not in plan:
            return np.arange(len(kid), dtype=np.int64), []
        if (plan["layout"], plan["grid"]) not in self._explicit:  # once per group
            rules, items, which = self.parsed[plan["grid"]]
            keep = np.ones(len(kid), bool)
            keep[items] = False
            fallback = [(int(i), rules[w]) for i, w in zip(items, which)
                        if int(kid[i]) not in self.ruled]
            self._explicit[plan["layout"], plan["grid"]] = np.flatnonzero(keep), fallback
        return self._explicit[plan["layout"], plan["grid"]]

    def with_fallback(self, rank, explicit, box, fallback, width):
        """``explicit`` and ``box`` with the fallback rule items' boxes added, by item."""
        rows = np.zeros((len(fallback), 2 * width), np.int64)
        layout = self.keys.gp.layouts[rank]
        for row, (i, rule) in enumerate(fallback):
            mesh = mesh_ranks(rule[0]).tolist()
            if rank not in mesh:
                raise UnsupportedValueError(f"rank {rank} holds {layout[i][0]} under a rule "
                                            "whose mesh does not include it")
            shape = tuple(layout[i][2])
            offs, sizes = predicted_box(rule, shape, np.unravel_index(
                mesh.index(rank), rule[0][0]))
            rows[row, :len(shape)], rows[row, width:width + len(shape)] = offs, sizes
        items = np.concatenate([explicit, [i for i, _ in fallback]]).astype(np.int64)
        order = np.argsort(items, kind="stable")
        return items[order], np.concatenate([box, rows])[order]

    def assignments(self) -> dict[int, list]:
        """``{rank: [(items, cell), ...]}``: which rule pieces each rank writes."""
        out: dict[int, list] = {}
        ruled = np.array(sorted(self.ruled), np.int64)
        for (layout_text, text), ranks in self.groups.items():
            if text is None:
                continue
            rules, items, which = self.parsed[text]
            kid = self.keys.gp.layout_kids[ranks[0]]
            for w, rule in enumerate(rules):
                mine = items[(which == w) & np.isin(kid[items], ruled)]
                if len(mine):
                    for r, got in assign(rule, mine, kid[mine], ranks).items():
                        out.setdefault(r, []).append(got)
        return out

    def splits(self) -> dict[int, tuple]:
        """``{key id: splits}`` of every ruled key."""
        out = {}
        for (layout_text, text), ranks in self.groups.items():
            if text is None:
                continue
            rules, items, which = self.parsed[text]
            kid = self.keys.gp.layout_kids[ranks[0]]
            for i, w in zip(items.tolist(), which.tolist()):
                if int(kid[i]) in self.ruled:
                    out[int(kid[i])] = splits_of(rules[w], self.keys.gp.shapes[kid[i]])
        return out


def layout_boxes(layout) -> np.ndarray:
    """Every shard's box (offsets, then sizes) of a ``ShardLayout``, the grid's cells row-major."""
    if layout.splits is None:
        return layout.boxes[:, :-1]
    return boxes(layout.shape, layout.splits)
