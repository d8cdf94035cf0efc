"""Who reads which shared chunk on a load, and how it reaches the others (share.py runs it).

Every rank posts the chunks its read plan names (``needs``); the coordinator (``assign``) gives
each chunk that several ranks need:

- one *reader* in the whole job, a needer (least-loaded, staying on one reader for runs of
  adjacent chunks so that they are read as one sequential stream);
- on every other node that needs it, one *receiver*: the needer of that node that has received
  least so far, to which the reader sends the bytes over gloo;
- for every needer, its *source*: the reader or receiver on its own node, whose shared-memory
  file (nodeshm.py) it decodes the chunk from.

A chunk only one rank needs stays in that rank's own read plan (read and decoded straight into
place, as without sharing).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .. import knobs
from ..format import tables


def needs(plan) -> dict:
    """This rank's payload for the "needs" round: every chunk its read plan names, as
    ``(file, offset, length)`` rows."""
    rows = sorted({(f, r.ref.offset, r.ref.length) for f, reads in plan.by_file.items()
                   for r in reads})
    return {"need": tables.encode(np.array(rows, np.int64).reshape(-1, 3))}


def _gather(payloads: dict[int, dict]) -> np.ndarray:
    """Every posted need as ``(file, offset, length, rank)``, in (file, offset, rank) order."""
    parts = []
    for r, p in sorted(payloads.items()):
        rows = tables.decode(p["need"], 3, f"rank {r} needs")
        parts.append(np.hstack([rows, np.full((len(rows), 1), r, np.int64)]))
    allrows = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
    return allrows[np.lexsort((allrows[:, 3], allrows[:, 1], allrows[:, 0]))]


def assign(payloads: dict[int, dict], node=None, stick_bytes: int | None = None) -> dict:
    """The coordinator's decision: each chunk several ranks need, its reader, its needers and
    where each needer takes it from.

    ``node[r]`` is rank r's node (default: all on one). Returns ``{"chunks": (file, offset,
    length, reader) rows, "needers": ranks, "sources": the rank each needer decodes from,
    "counts": needers per chunk}`` as tables, chunks in (file, offset) order. The reader stays
    the previous chunk's while that one is a needer and no more than ``stick_bytes`` (default:
    knob ``upload_part_bytes``; at most half an even share of the shared bytes) ahead of the
    least-loaded needer.
    """
    stick = knobs.get("upload_part_bytes") if stick_bytes is None else stick_bytes
    allrows = _gather(payloads)
    width = max(payloads) + 1 if payloads else 1
    node = np.zeros(width, np.int64) if node is None else np.asarray(node, np.int64)
    new = np.ones(len(allrows), bool)
    new[1:] = (allrows[1:, 0] != allrows[:-1, 0]) | (allrows[1:, 1] != allrows[:-1, 1])
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(allrows)))
    shared = counts > 1
    load, received = np.zeros(width, np.int64), np.zeros(width, np.int64)
    # Never stick past an even share: a small checkpoint is still spread over the ranks.
    stick = min(stick, int(allrows[starts[shared], 2].sum()) // (2 * width))
    readers, needers, sources, prev = [], [], [], -1
    for s, n in zip(starts[shared], counts[shared]):
        members = allrows[s:s + n, 3]
        length = int(allrows[s, 2])
        best = int(members[np.argmin(load[members])])
        if prev in members and load[prev] - load[best] <= stick:
            best = prev
        load[best] += length
        readers.append(best)
        needers.append(members)
        sources.append(_sources(members, best, node, received, length))
        prev = best
    chunks = np.column_stack([allrows[starts[shared], :3],
                              np.array(readers, np.int64)]).reshape(-1, 4)
    flat = np.concatenate(needers) if needers else np.zeros(0, np.int64)
    src = np.concatenate(sources) if sources else np.zeros(0, np.int64)
    return {"chunks": tables.encode(chunks), "needers": tables.encode(flat.reshape(-1, 1)),
            "sources": tables.encode(src.reshape(-1, 1)),
            "counts": tables.encode(counts[shared].reshape(-1, 1))}


def _sources(members: np.ndarray, reader: int, node: np.ndarray, received: np.ndarray,
             length: int) -> np.ndarray:
    """For each needer of one chunk, the rank on its node that holds the chunk: the reader on
    the reader's node, elsewhere the needer that has received least (it gets the bytes by gloo)."""
    out = np.empty(len(members), np.int64)
    where = node[members]
    for u in np.unique(where):
        here = where == u
        if u == node[reader]:
            out[here] = reader
            continue
        local = members[here]
        receiver = int(local[np.argmin(received[local])])
        received[receiver] += length
        out[here] = receiver
    return out


class SharedPlan:
    """This rank's part of the coordinator's decision, read once from its tables."""

    def __init__(self, decision: dict, rank: int):
        self.chunks = tables.decode(decision["chunks"], 4, "share plan")
        counts = tables.decode(decision["counts"], 1, "share plan")[:, 0]
        self.needers = tables.decode(decision["needers"], 1, "share plan")[:, 0]
        self.sources = tables.decode(decision["sources"], 1, "share plan")[:, 0]
        if len(self.sources) != len(self.needers) or int(counts.sum()) != len(self.needers) \
                or len(counts) != len(self.chunks):
            raise ValueError("share plan tables disagree in length")
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.rank = rank
        owner = np.repeat(np.arange(len(counts)), counts)
        self.mine = np.zeros(len(counts), bool)  # chunks this rank needs
        self.mine[owner[self.needers == rank]] = True

    def entries(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``c``'s needers and the source of each."""
        a, b = self.first[c], self.first[c + 1]
        return self.needers[a:b], self.sources[a:b]

    def needed_by(self, c: int) -> np.ndarray:
        return self.entries(c)[0]

    def receivers(self, c: int) -> list[int]:
        """The ranks that get chunk ``c`` from its reader over gloo (one per other node)."""
        n, s = self.entries(c)
        return sorted({int(r) for r in n[(n == s) & (n != self.chunks[c, 3])]})

    def rounds(self, budget: int):
        """Chunk indices in rounds of at most ``budget`` stored bytes (at least one chunk)."""
        out, size, start = [], 0, 0
        for c, length in enumerate(self.chunks[:, 2]):
            if c > start and size + length > budget:
                out.append(range(start, c))
                start, size = c, 0
            size += int(length)
        if start < len(self.chunks):
            out.append(range(start, len(self.chunks)))
        return out


def take_shared(plan, shared: SharedPlan) -> dict:
    """Remove the shared chunks this rank needs from its own read plan: ``{(file, offset):
    [ChunkRead, ...]}`` to decode from shared bytes instead."""
    keys = {(int(f), int(o)) for f, o in shared.chunks[shared.mine, :2]}
    taken = defaultdict(list)
    for f in list(plan.by_file):
        keep = []
        for r in plan.by_file[f]:
            (taken[(f, r.ref.offset)] if (f, r.ref.offset) in keys else keep).append(r)
        if keep:
            plan.by_file[f] = keep
        else:
            del plan.by_file[f]
    return taken
