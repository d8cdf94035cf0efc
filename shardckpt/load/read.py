"""Read plans: which stored chunks fill which target memory, fetched and decoded into place.

Every check that needs no data happens before the first read (manifest rules, file sizes, paths
that must stay inside the checkpoint). Chunks decode straight into the destination tensor's
memory whenever it is a dense CPU tensor of the saved dtype covering the shard; otherwise (another
dtype, device or layout) into a shard-sized buffer of the saved dtype that is then copied, and
cast, into the destination's box. Every decode also tells the codec backend how many bytes its
destination holds there, and the backend refuses a read that would not fit exactly.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from .. import codecs, knobs
from . import fetch
from ..format import manifest as manifest_mod
from ..errors import CorruptCheckpointError
from ..format.opening import RemoteFile, file_label
from ..codecs.status import raise_for
from ..format.tree import local_box
from ..types import MANIFEST_NAME, ChunkRead, ChunkRef, Manifest, ShardEntry, TensorEntry


class ReadPlan:
    """Chunk reads grouped by file, and the copies that follow them."""

    def __init__(self, m: Manifest):
        self.m = m
        self.kinds = manifest_mod.chain_kinds(m)
        self.by_file: dict[int, list[ChunkRead]] = defaultdict(list)
        self.after: list[Callable[[], None]] = []
        self._keep: list[torch.Tensor] = []

    def _add(self, key: str, entry: TensorEntry, row: list[int], i: int, dest: int,
             into: torch.Tensor | None = None) -> None:
        """Plan chunk ``i`` (its table row as ints) into ``dest``, an address inside the dense
        tensor ``into`` (``dest`` 0: verify only)."""
        c = ChunkRef(*row)
        kind, shuffle_size = self.kinds[c.codec]
        raw = c.count * entry.dtype.itemsize
        self.by_file[c.file].append(ChunkRead(c, raw, kind, shuffle_size, dest, key, int(i),
                                              _room(into, dest, raw)))

    def _shard(self, key: str, entry: TensorEntry, shard: ShardEntry, base: int,
               first: int = 0, last: int | None = None,
               into: torch.Tensor | None = None) -> None:
        """Read the chunks of ``shard`` that overlap elements ``[first, last)`` into ``base``,
        the address of the shard-sized buffer ``into`` (0: verify only)."""
        starts, counts = shard.chunks[:, 3], shard.chunks[:, 4]
        wanted = starts + counts > first
        if last is not None:
            wanted &= starts < last
        for i in np.flatnonzero(wanted):
            self._add(key, entry, shard.chunks[i].tolist(), i,
                      base + int(starts[i]) * entry.dtype.itemsize if base else 0, into)

    def into(self, key: str, target: torch.Tensor, offsets: tuple | None = None) -> None:
        """Fill ``target`` from every saved shard of tensor ``key`` that overlaps it.

        ``target`` is the whole tensor, a DTensor (its local shard is filled), or with
        ``offsets`` any box of the global tensor starting there.
        """
        entry = self.m.tensors[key]
        if offsets is None:
            local, _, offsets, _ = local_box(target)
        else:
            local, offsets = target, tuple(offsets)
        shape = tuple(local.shape)
        # Decoding in place needs the saved dtype: the raw bytes of another would be garbage
        # and, for a narrower one, run past the end of the target.
        direct = (local.device.type == "cpu" and local.dtype == entry.dtype.torch
                  and local.is_contiguous() and not local.is_conj() and not local.is_neg())
        if not local.numel():
            return
        if direct and len(entry.boxes) == 1 and shape == entry.shape:
            self._whole(key, entry, local)  # the common single-process case, without numpy
            return
        for index in entry.overlapping(offsets, tuple(o + n for o, n in zip(offsets, shape))):
            shard = entry.shard(index)
            lo = tuple(max(a, b) for a, b in zip(shard.offsets, offsets))
            box = tuple(min(a + n, b + m) - low for a, n, b, m, low in
                        zip(shard.offsets, shard.shape, offsets, shape, lo))
            if direct and _contiguous_within(box, shard.shape) and _contiguous_within(box, shape):
                self._run(key, entry, shard, local, offsets, lo, box)
            else:
                self._via_buffer(key, entry, shard, local, offsets, lo, box)

    def _whole(self, key: str, entry: TensorEntry, local: torch.Tensor) -> None:
        """One saved shard, the whole tensor, into a dense CPU target: every chunk in place."""
        itemsize, base = entry.dtype.itemsize, local.data_ptr()
        for i, row in enumerate(entry.chunks.tolist()):
            self._add(key, entry, row, i, base + row[3] * itemsize, local)

    def _run(self, key, entry, shard, local, offsets, lo, box) -> None:
        """The overlap is one contiguous run in both the saved shard and the target (same
        layout, or Shard(0) pieces of another world size): chunks inside it decode straight
        into the target; the (at most two) chunks straddling its ends go through their own
        chunk-sized buffers."""
        itemsize = entry.dtype.itemsize
        first = _flat(tuple(a - b for a, b in zip(lo, shard.offsets)), shard.shape)
        last = first + math.prod(box)
        at = _flat(tuple(a - b for a, b in zip(lo, offsets)), tuple(local.shape))
        base = local.data_ptr() + (at - first) * itemsize  # where shard element 0 would land
        starts, counts = shard.chunks[:, 3], shard.chunks[:, 4]
        inside = (starts >= first) & (starts + counts <= last)
        for i in np.flatnonzero(inside):
            self._add(key, entry, shard.chunks[i].tolist(), i, base + int(starts[i]) * itemsize,
                      local)
        flat = local.view(-1)
        for i in np.flatnonzero(~inside & (starts < last) & (starts + counts > first)):
            start, count = int(starts[i]), int(counts[i])
            buf = torch.empty(count, dtype=entry.dtype.torch)
            self._keep.append(buf)
            self._add(key, entry, shard.chunks[i].tolist(), i, buf.data_ptr(), buf)
            a, b = max(start, first), min(start + count, last)
            dst, src = flat[at + a - first:at + b - first], buf[a - start:b - start]
            self.after.append(lambda dst=dst, src=src: dst.copy_(src))

    def _via_buffer(self, key, entry, shard, local, offsets, lo, box) -> None:
        """Decode the chunks covering the overlap into a shard-sized buffer, then copy the box."""
        buf = torch.empty(shard.shape, dtype=entry.dtype.torch)
        self._keep.append(buf)
        start = tuple(a - b for a, b in zip(lo, shard.offsets))
        end = tuple(a + n - 1 for a, n in zip(start, box))
        self._shard(key, entry, shard, buf.data_ptr(), _flat(start, shard.shape),
                    _flat(end, shard.shape) + 1, buf)
        src = buf[tuple(slice(a, a + n) for a, n in zip(start, box))]
        dst = local[tuple(slice(a - o, a - o + n) for a, o, n in zip(lo, offsets, box))]
        self.after.append(lambda: dst.copy_(src))

    def verify_all(self) -> None:
        """Plan a read of every chunk that only checks and decodes (no destination)."""
        for key, entry in self.m.tensors.items():
            for index in np.flatnonzero(entry.counts):  # empty shards have nothing to read
                self._shard(key, entry, entry.shard(int(index)), 0)

    def run(self, paths: list, threads: int | None = None) -> None:
        """Fetch, verify and decode every planned chunk, then do the copies. ``paths`` as
        ``open_for_read`` returns them."""
        threads = knobs.get("read_threads") if threads is None else threads
        files = sorted(self.by_file.items())
        # Files are read concurrently (the native reads release the GIL), threads shared out.
        per_file = threads or max(1, (os.cpu_count() or 1) // max(len(files), 1))
        with ThreadPoolExecutor(max(len(files), 1)) as pool:
            statuses = list(pool.map(lambda fr: read_file_chunks(
                paths[fr[0]], [backend_request(r) for r in fr[1]], per_file), files))
        for (file_index, reads), status in zip(files, statuses):
            raise_for(status, file=file_label(self.m, self.m.files[file_index]),
                      describe=lambda i, reads=reads: (reads[i].tensor, reads[i].chunk_index))
        with torch.no_grad():
            for fn in self.after:
                fn()
        self._keep.clear()


def read_blob(m: Manifest, paths: list, key: str) -> bytes:
    """The bytes of a ``bytes`` / ``bytesio`` leaf (FORMAT.md 3.4, revision 1.2): its 1-D uint8
    tensor, read at once."""
    entry = m.tensors[key]
    if entry.dtype.name != "uint8" or len(entry.shape) != 1:
        raise CorruptCheckpointError("a bytes value must name a 1-D uint8 tensor",
                                     file=MANIFEST_NAME, tensor=key)
    t = torch.empty(entry.shape, dtype=torch.uint8)
    plan = ReadPlan(m)
    plan.into(key, t)
    plan.run(paths)
    return t.numpy().tobytes()


def read_file_chunks(source, reads: list[tuple], threads: int) -> tuple:
    """The backend's read of one local file, or a remote one's ranged GETs."""
    if isinstance(source, RemoteFile):
        return fetch.read_chunks(source, reads, threads)
    return codecs.backend.read_chunks(source, reads, threads)


def backend_request(r: ChunkRead) -> tuple:
    """The tuple the codec backend's ``read_chunks`` takes for one planned chunk."""
    return (r.ref.offset, r.ref.length, r.raw_length, r.kind, r.shuffle_size, r.ref.crc, r.dest,
            r.dest_bytes)


def _room(into: torch.Tensor | None, dest: int, raw: int) -> int:
    """How many of the ``raw`` bytes a chunk decodes to fit at ``dest`` inside the dense tensor
    ``into``: ``raw`` when the plan is sound, fewer when it would run past the tensor's end, 0
    for an address outside it. Worked out from the tensor alone, not from the chunk arithmetic
    that chose ``dest``, so the backend's check is independent of it."""
    if not dest or into is None:
        return 0
    lo = into.data_ptr()
    hi = lo + into.numel() * into.element_size()
    return max(0, min(dest + raw, hi) - dest) if lo <= dest < hi else 0


def _flat(index: tuple, shape: tuple) -> int:
    """Row-major position of ``index`` in an array of ``shape``."""
    pos = 0
    for i, n in zip(index, shape):
        pos = pos * n + i
    return pos


def _contiguous_within(sub: tuple, full: tuple) -> bool:
    """Whether a box of shape ``sub`` is one contiguous run in a row-major array of ``full``:
    leading dimensions of size 1, then one partial dimension, then whole dimensions."""
    d = 0
    while d < len(sub) and sub[d] == 1:
        d += 1
    return all(s == f for s, f in zip(sub[d + 1:], full[d + 1:]))
