"""Load: open and check the manifest, plan the chunk reads, fetch and decode into place.

Every check that needs no data happens before the first read (manifest rules, file sizes, paths
that must stay inside the checkpoint). Chunks decode straight into the destination tensor's
memory whenever it is a dense CPU tensor of the saved dtype covering the shard; otherwise (another
dtype, device or layout) into a shard-sized buffer of the saved dtype that is then copied, and
cast, into the destination's box. Every decode also tells the codec backend how many bytes its
destination holds there, and the backend refuses a read that would not fit exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import stat
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from . import chunk_index, codecs, knobs, manifest as manifest_mod, remote_io
from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError,
                     IncompleteCheckpointError, UnsafeCheckpointError)
from .status import raise_for
from .storage import Storage, open_checkpoint, storage_error
from .tree import local_box
from .types import (FILE_HEADER, HEADER_BYTES, MANIFEST_NAME, ChunkRead, ChunkRef, FileEntry,
                    Manifest, ShardEntry, TensorEntry)


def open_manifest(storage: Storage, name: str) -> Manifest:
    """The checkpoint's parsed, validated manifest."""
    return checked_manifest(storage, name, manifest_bytes(storage, name))


def manifest_bytes(storage: Storage, name: str) -> bytes:
    """The checkpoint's manifest bytes, bounded in size, unchecked (``checked_manifest``). For a
    revision 1.4 manifest, the bytes of its index files follow in one framed blob
    (chunk_index.bundle): whoever fetches this once (share.py: one rank, then a broadcast)
    hands every rank all it needs to open the checkpoint."""
    where = storage.url(name)
    with reading(f"{where}: the checkpoint folder",
                 lambda: CheckpointNotFoundError(f"{where}: removed while being opened")):
        if not storage.exists(name) and _absent(storage, name):
            raise CheckpointNotFoundError(f"{where}: no checkpoint here")
        local = storage.local_path(name)
        if local is not None and not os.path.exists(local):  # lexists, not exists: a link
            raise CheckpointNotFoundError(f"{where}: a symbolic link to nothing")
    rel = f"{name}/{MANIFEST_NAME}"
    with reading(f"{where}/{MANIFEST_NAME}", lambda: IncompleteCheckpointError(
            f"{where}/{MANIFEST_NAME}: removed while being opened (retention or gc)")):
        if not storage.exists(rel) and _absent(storage, rel):
            raise IncompleteCheckpointError(f"{where}: no {MANIFEST_NAME}; the save that made "
                                            "this folder never committed")
        if storage.local_path(rel):
            check_inside(storage.local_path(name), MANIFEST_NAME)
        if storage.size(rel) > manifest_mod.MAX_MANIFEST_BYTES:
            raise UnsafeCheckpointError(f"{where}/{MANIFEST_NAME} is larger than 1 GiB")
        # Bounded even if the file grows after the size check.
        data = storage.read(rel, 0, manifest_mod.MAX_MANIFEST_BYTES + 1)
    if b'"indexes":' not in data:  # no revision 1.4 index files (cheap test, no parse)
        return data
    m = manifest_mod.parse(data, _on_disk(storage, name))  # for its indexes; receivers
    # check everything again
    if m.indexes is None:
        return data
    return chunk_index.bundle(data, [_index_bytes(storage, name, e) for e in m.indexes])


@contextlib.contextmanager
def reading(label: str, missing: Callable[[], CheckpointError] | None = None):
    """Turn an OSError met while opening ``label`` into a typed error naming it: ``missing()``
    for a file that is not there (when given), else StorageError or its subclass that also is
    the stdlib type (PermissionError for mode 000, NotADirectoryError for a file where a folder
    belongs; OSError for a symbolic link loop)."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError as exc:
        if missing is None:
            raise storage_error(exc, label) from exc
        raise missing() from exc
    except OSError as exc:
        raise storage_error(exc, label) from exc


def _absent(storage: Storage, rel: str) -> bool:
    """Whether ``rel``, which ``storage.exists`` does not see, is truly absent. On a local disk
    ``exists`` is also false when a folder on the way cannot be searched (mode 000), is a file,
    or loops; an lstat raises the real reason, which ``reading`` types."""
    local = storage.local_path(rel)
    if local is None:
        return True
    try:
        os.lstat(local)
    except FileNotFoundError:
        return True
    return False


def checked_manifest(storage: Storage, name: str, data: bytes) -> Manifest:
    """Manifest bytes of checkpoint ``name`` parsed and validated (FORMAT.md 3); a revision 1.4
    manifest gets its chunk rows joined from its index files (FORMAT.md 3.7), checked alike."""
    data, fetched = chunk_index.unbundle(data)
    m = manifest_mod.parse(data, _on_disk(storage, name))
    if any(f.base == name for f in m.files):
        raise UnsafeCheckpointError(f"{storage.url(name)}/{MANIFEST_NAME}: a file names its own "
                                    "checkpoint as its base")
    m = dataclasses.replace(m, name=name)
    if m.indexes is not None:
        if fetched is not None and len(fetched) != len(m.indexes):
            raise CorruptCheckpointError("manifest bundle lacks index files",
                                         file=MANIFEST_NAME)
        m = chunk_index.join(m, lambda i, entry: fetched[i] if fetched is not None
                             else _index_bytes(storage, name, entry),
                             _on_disk(storage, name), len(data))
        manifest_mod.check_joined(m)
    return m


def _on_disk(storage: Storage, name: str):
    """``data_bytes`` for the metadata budget (budget.py): the bytes data files store, each
    checked on disk first (a manifest may record any size), asked only for a large manifest. A
    local file counts its allocated blocks: a sparse file's holes are no bytes on disk."""
    def total(files) -> int:
        root = storage.local_path(name)
        if root is None:
            for f in files:
                remote_io.check_object(storage, name, f)
            return sum(f.size for f in files)
        return sum(min(f.size, getattr(os.stat(check_data_file(root, f)), "st_blocks", 1 << 62)
                       * 512) for f in files)
    return total


def _index_bytes(storage: Storage, name: str, entry) -> bytes:
    """An index file's bytes, read inside the checkpoint and bounded by its recorded size."""
    root = storage.local_path(name)
    if root is not None:
        check_inside(root, entry.path)
    with reading(f"{storage.url(name)}/{entry.path}", lambda: CorruptCheckpointError(
            "chunk index file is missing", file=entry.path)):
        return storage.read(f"{name}/{entry.path}", 0, entry.size + 1)


def file_label(m: Manifest, f: FileEntry) -> str:
    """How messages name data file ``f`` of ``m``: its path, and for a reference the
    checkpoint that stores it and the one that references it (FORMAT.md 3.6)."""
    if f.base is None:
        return f.path
    return f"{f.location} (stored by checkpoint {f.base!r}, referenced by {m.name!r})"


def check_inside(root: str, rel: str, label: str | None = None) -> str:
    """The real path of ``rel`` under ``root``; refuses one that resolves outside it (a symbolic
    link) or that is not a regular file (a FIFO or device would block or never end). ``root`` is
    the checkpoint, or for a referenced file (``label`` names it) the root holding both."""
    root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, rel))
    where = "the checkpoint" if label is None else "the checkpoints' root"
    if os.path.commonpath([root, real]) != root:
        raise UnsafeCheckpointError(f"{label or rel} resolves outside {where} ({real})")
    if os.path.exists(real) and not stat.S_ISREG(os.stat(real).st_mode):
        raise UnsafeCheckpointError(f"{label or rel} is not a regular file")
    return real


def data_paths(storage: Storage, name: str, m: Manifest) -> list[str]:
    """Real paths of the data files, each checked to lie inside the checkpoint and to have the
    size the manifest records. Every path is checked before any data file is opened."""
    root, parent = storage.local_path(name), storage.local_path("")
    paths = [check_inside(root, f.path) if f.base is None else
             check_inside(parent, f.location, file_label(m, f)) for f in m.files]
    return [_check_file(real, f, file_label(m, f)) for f, real in zip(m.files, paths)]


def check_data_file(root: str, f: FileEntry) -> str:
    """The real path of data file ``f`` of the checkpoint folder ``root``, after checking that it
    lies inside the checkpoint, is a regular file, and has the manifest's size and the format's
    header.

    Raises:
        UnsafeCheckpointError: the path resolves outside the checkpoint or is no regular file.
        CorruptCheckpointError: the file is missing, has another size, or a foreign header.
    """
    if f.base is not None:  # a reference: the file lives in the sibling checkpoint f.base
        parent = os.path.dirname(os.path.realpath(root))
        return _check_file(check_inside(parent, f.location, f.location), f, f.location)
    return _check_file(check_inside(root, f.path), f)


def _check_file(real: str, f: FileEntry, label: str | None = None) -> str:
    label = label or f.path
    with reading(f"data file {label} ({real})",
                 lambda: CorruptCheckpointError("data file is missing", file=label)):
        size = os.stat(real).st_size
        if size != f.size:
            raise CorruptCheckpointError(f"data file has {size} bytes, the manifest says "
                                         f"{f.size} (truncated or overwritten)", file=label)
        with open(real, "rb") as fh:
            if fh.read(HEADER_BYTES) != FILE_HEADER:
                raise CorruptCheckpointError("data file header is not SHRDCKPT v1", file=label)
    return real


def open_for_read(path, storage_options: dict | None = None) -> tuple[Manifest, list]:
    """The validated manifest and checked data files of the checkpoint at ``path``: real paths,
    or on object stores ``remote_io.RemoteFile`` objects."""
    storage, name = open_checkpoint(path, storage_options)
    m = open_manifest(storage, name)
    return m, data_sources(storage, name, m)


def data_sources(storage: Storage, name: str, m: Manifest) -> list:
    """The checked data files of manifest ``m``: real paths, or on object stores
    ``remote_io.RemoteFile`` objects."""
    if storage.local_path(name) is None:
        return remote_io.data_objects(storage, name, m)
    return data_paths(storage, name, m)


class LazySources:
    """The data files of manifest ``m`` as ``data_sources`` gives them, each checked on its first
    use, so that a rank of a large job stats and reads the header of only the files it reads.
    Thread-safe (files are read concurrently)."""

    def __init__(self, storage: Storage, name: str, m: Manifest):
        self.storage, self.name, self.m = storage, name, m
        self.root = storage.local_path(name)
        self._checked: dict[int, object] = {}
        self._lock = threading.Lock()

    def __getitem__(self, i: int):
        with self._lock:
            if i not in self._checked:
                f = self.m.files[i]
                self._checked[i] = (remote_io.check_object(self.storage, self.name, f)
                                    if self.root is None else check_data_file(self.root, f))
            return self._checked[i]


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
    if isinstance(source, remote_io.RemoteFile):
        return remote_io.read_chunks(source, reads, threads)
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
