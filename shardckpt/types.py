"""The shared vocabulary: frozen records every stage of the pipeline passes along.

Save: plan (``TensorItem`` -> ``ChunkSource``) -> encode/write (``ChunkRef``) -> commit
(``Manifest``). Load: ``Manifest`` -> read plan (``ChunkRead``) -> decode -> place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

FORMAT_NAME = "shardckpt"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
FILE_MAGIC = b"SHRDCKPT"
FILE_HEADER = FILE_MAGIC + FORMAT_VERSION.to_bytes(4, "little") + (0).to_bytes(4, "little")
HEADER_BYTES = len(FILE_HEADER)


@dataclass(frozen=True)
class DType:
    """A dtype the format knows: its manifest name, torch dtype and byte sizes."""

    name: str
    torch: torch.dtype
    itemsize: int
    shuffle_size: int  # size of one scalar component (complex: half the itemsize)


def _known_dtypes() -> dict[str, DType]:
    names = ["bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
             "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
             "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]
    table = {}
    for name in names:
        dt = getattr(torch, name, None)
        if dt is None:  # older torch without this dtype: such checkpoints cannot be loaded there
            continue
        itemsize = torch.empty((), dtype=dt).element_size()
        table[name] = DType(name, dt, itemsize, itemsize // 2 if dt.is_complex else itemsize)
    return table


DTYPES: dict[str, DType] = _known_dtypes()
DTYPE_BY_TORCH: dict[torch.dtype, DType] = {d.torch: d for d in DTYPES.values()}


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint, "data/..."
    size: int
    rank: int
    base: str | None = None  # a sibling checkpoint that stores this file (FORMAT.md 3.6)

    @property
    def location(self) -> str:
        """Where the file lives relative to the root holding the checkpoint's folder, given
        the checkpoint's own name for a file it stores itself."""
        return f"{self.base}/{self.path}"


@dataclass(frozen=True)
class IndexEntry:
    """A rank's chunk index file (FORMAT.md 3.7, revision 1.4): where its chunk rows are."""

    path: str  # "data/rank-NNNNN.idx"
    size: int
    rank: int
    crc: int  # CRC-32C of the whole file


@dataclass(frozen=True, eq=False)
class TensorLayout:
    """A tensor of a revision 1.4 manifest before its chunk rows are joined from the index
    files: a grid rule (``splits``: ``(dim, parts, kind)``) or explicit ``boxes``."""

    dtype: "DType"
    shape: tuple[int, ...]
    splits: tuple | None = None
    boxes: np.ndarray | None = None  # (S, 2 * ndim + 1) when ``splits`` is None: box, writer


CHUNK_COLUMNS = ("file", "offset", "length", "start", "count", "codec", "crc32c")


@dataclass(frozen=True)
class ChunkRef:
    """One stored chunk (FORMAT.md 3.3): where its bytes are and how to decode them."""

    file: int
    offset: int
    length: int
    start: int
    count: int
    codec: int
    crc: int

    def as_list(self) -> list[int]:
        return [self.file, self.offset, self.length, self.start, self.count, self.codec, self.crc]


@dataclass(frozen=True)
class ShardEntry:
    """One saved piece of a tensor: a box of the global tensor and its chunk rows."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    chunks: np.ndarray  # (n, 7) int64 rows in CHUNK_COLUMNS order


@dataclass(frozen=True, eq=False)
class TensorEntry:
    """A saved tensor, its shards kept as arrays so that a table of millions of shards costs
    vectorized work, not a Python object per shard (FORMAT.md 3.3)."""

    dtype: DType
    shape: tuple[int, ...]
    boxes: np.ndarray   # (S, 2 * ndim) int64: each shard's offsets, then its shape
    counts: np.ndarray  # (S,) int64: chunks per shard
    chunks: np.ndarray  # (C, 7) int64: the chunk rows, shard after shard

    @classmethod
    def build(cls, dtype: DType, shape, shards: list[tuple]) -> "TensorEntry":
        """From ``(offsets, shape, chunk rows)`` triples."""
        nd = len(shape)
        boxes = np.array([list(o) + list(s) for o, s, _ in shards], dtype=np.int64).reshape(
            len(shards), 2 * nd)
        rows = [np.asarray(c, dtype=np.int64).reshape(-1, 7) for _, _, c in shards]
        chunks = np.concatenate(rows) if rows else np.empty((0, 7), np.int64)
        counts = np.array([len(r) for r in rows], dtype=np.int64)
        return cls(dtype, tuple(shape), boxes, counts, chunks)

    @cached_property
    def first(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)])

    def shard(self, i: int) -> ShardEntry:
        nd = len(self.shape)
        box = self.boxes[i]
        return ShardEntry(tuple(int(v) for v in box[:nd]), tuple(int(v) for v in box[nd:]),
                          self.chunks[self.first[i]:self.first[i + 1]])

    @property
    def shards(self) -> list[ShardEntry]:
        return [self.shard(i) for i in range(len(self.boxes))]

    def overlapping(self, lo, hi) -> np.ndarray:
        """Indices of the non-empty shards that intersect the box ``[lo, hi)``."""
        nd = len(self.shape)
        starts, sizes = self.boxes[:, :nd], self.boxes[:, nd:]
        hit = (np.all(starts < np.asarray(hi, np.int64), axis=1)
               & np.all(starts + sizes > np.asarray(lo, np.int64), axis=1)
               & np.all(sizes > 0, axis=1))
        return np.flatnonzero(hit)


@dataclass(frozen=True)
class Manifest:
    world_size: int
    files: tuple[FileEntry, ...]
    codecs: tuple[tuple[dict, ...], ...]
    tensors: dict[str, TensorEntry]
    tree: Any
    metadata: dict
    writer: dict = field(default_factory=dict)
    created_unix: float = 0.0
    rank_overrides: tuple | None = None  # [rank, [[path, node], ...]] where ranks differed
    # (C, 2) int64: each chunk's xxh3-128 content hash (lo, hi), chunk rows of the tensors in
    # order; None when the save did not hash (FORMAT.md 3.6).
    hashes: np.ndarray | None = field(default=None, compare=False)
    name: str = field(default="", compare=False)  # its folder name once opened (messages)
    # Revision 1.4: the per-rank chunk index files; ``tensors`` then holds TensorLayouts until
    # read.checked_manifest joins the rows in (and keeps this, so copies bring the files along).
    indexes: tuple[IndexEntry, ...] | None = None


@dataclass(slots=True)  # not frozen: a save builds hundreds, and frozen init is 3x slower
class TensorItem:
    """A tensor of the state to save, under its manifest key: this rank's piece of it.

    For a DTensor (``dtensor``), ``tensor`` is the local shard or replica, placed at ``offsets``
    in ``global_shape``; a plain tensor is whole (zero offsets) and taken as replicated across
    ranks unless their copies differ.
    """

    key: str
    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    dtensor: bool = False
    rule: str | None = None  # a DTensor's grid rule as JSON text (grid.rule_of), if it has one


@dataclass(frozen=True)
class ChunkSource:
    """Raw bytes of one chunk to encode: memory that stays valid until the write returns."""

    key: str
    ptr: int
    nbytes: int
    shuffle_size: int
    start: int
    count: int


@dataclass(frozen=True)
class ChunkRead:
    """One chunk to fetch and decode into ``dest`` (0: verify only)."""

    ref: ChunkRef
    raw_length: int
    kind: int
    shuffle_size: int
    dest: int
    tensor: str
    chunk_index: int
    dest_bytes: int = 0  # bytes the destination holds at ``dest`` (the native side checks it)


@dataclass(frozen=True)
class SaveInfo:
    """What a save wrote."""

    path: str
    tensors: int
    raw_bytes: int
    stored_bytes: int
    seconds: float
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_report(cls, path: str, report: dict, seconds: float) -> "SaveInfo":
        """From this rank's write report (saver.write_rank)."""
        stored = sum(f["size"] - HEADER_BYTES for f in report["files"])
        return cls(path, report["tensors"], report["raw_bytes"], stored, seconds,
                   report.get("stats", {}))


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked; ``problems`` lists the faults found in collect mode."""

    path: str
    tensors: int
    chunks: int
    stored_bytes: int
    raw_bytes: int
    problems: tuple = ()

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.problems
