"""A tensor's shard and chunk tables (FORMAT.md 3.3): base64 of a zstd frame of int64 rows.

A checkpoint of thousands of ranks holds millions of shards; kept as arrays they are encoded,
decoded and validated with vectorized numpy work instead of a Python object per shard, and zstd
shrinks them about 8x (small integers, repeated sizes). Decoding treats the tables as
untrusted: every rule of FORMAT.md 3.3 is checked before any data is read.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading

import numpy as np
import zstandard

from .. import codecs, knobs
from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from ..types import HEADER_BYTES, MANIFEST_NAME, DType, TensorEntry

MAX_VALUE = 1 << 62
PAIRWISE_LIMIT = 64  # up to this many shards, overlaps are checked pairwise
MAX_GRID_CELLS = 1 << 24


MAX_TABLE_BYTES = 1 << 33  # decoded size of one table a reader accepts
# zstd's densest encoding is an RLE block: 4 bytes for 128 KiB. A frame claiming more output
# per stored byte cannot be valid; refusing it up front bounds what a reader allocates.
MAX_ZSTD_RATIO = 1 << 15


_local = threading.local()  # zstd contexts are reused per thread (a merge decodes thousands)


def _zstd():
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=1, write_content_size=True)
        _local.d = zstandard.ZstdDecompressor()
    return _local.c, _local.d


def encode(rows: np.ndarray) -> str:
    raw = np.ascontiguousarray(rows, dtype="<i8").tobytes()
    return base64.b64encode(_zstd()[0].compress(raw)).decode("ascii")


def pack_text(obj) -> str:
    """JSON text of ``obj``, zstd-compressed and base64-encoded: a compact, escape-free field
    that the coordinator compares as a string across ranks and parses only when it differs."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return base64.b64encode(_zstd()[0].compress(text)).decode("ascii")


# The last text packed per name: a periodic save sends the same layout and skeleton each time,
# and comparing two trees (in C) is several times faster than encoding one. A (value, text)
# tuple is swapped in whole, so threads sharing a name never see a mismatched pair.
_PACKED: dict[str, tuple] = {}


def pack_text_again(name: str, obj) -> str:
    """``pack_text(obj)``, reusing the text packed under ``name`` last time when ``obj`` equals
    that value. Only for values whose equality is their JSON's: no floats (``1 == 1.0``), and
    bools only in fields that hold a bool in every value (``True == 1``). ``obj`` is kept, so
    the caller must not change it afterwards."""
    last = _PACKED.get(name)
    if last is not None and last[0] == obj:
        return last[1]
    text = pack_text(obj)
    _PACKED[name] = (obj, text)
    return text


def unpack_text(field: str, where: str):
    """The object ``pack_text`` packed (the coordinator's own ranks wrote it)."""
    try:
        return json.loads(_zstd()[1].decompress(base64.b64decode(field, validate=True)))
    except (binascii.Error, ValueError, zstandard.ZstdError) as exc:
        raise CorruptCheckpointError(f"{where}: damaged packed field ({exc})") from None


def encode_entry(t: TensorEntry) -> dict:
    """The JSON fields ``shards`` and ``chunks`` of a tensor entry."""
    shards = np.concatenate([t.boxes, t.counts.reshape(-1, 1)], axis=1)
    return {"shards": encode(shards), "chunks": encode(t.chunks)}


def declared_size(text, where: str) -> int:
    """The decoded byte size the table ``text`` declares, read from its zstd frame header alone
    (nothing is decompressed), so a reader can total its tables before decoding any
    (budget.py). Refuses a size over ``MAX_TABLE_BYTES``, an unknown one, or one no frame of
    this length can hold (over ``MAX_ZSTD_RATIO`` per stored byte).

    Raises:
        CorruptCheckpointError: naming ``where``.
    """
    if not isinstance(text, str):
        raise CorruptCheckpointError(f"{where} is not a base64 string", file=MANIFEST_NAME)
    try:
        head = base64.b64decode(text[:24], validate=True)  # 18 bytes: any frame header
        size = zstandard.get_frame_parameters(head).content_size
        stored = len(text) // 4 * 3
        if size > MAX_TABLE_BYTES or size > stored * MAX_ZSTD_RATIO:  # and CONTENTSIZE_UNKNOWN
            raise ValueError(f"declares {size} bytes")
    except (binascii.Error, ValueError, zstandard.ZstdError) as exc:
        raise CorruptCheckpointError(f"{where} is not a base64 zstd frame of the table: {exc}",
                                     file=MANIFEST_NAME) from None
    return size


def decode(text, columns: int, where: str) -> np.ndarray:
    """An int64 table from base64 text; CorruptCheckpointError names ``where`` if malformed.
    The frame is decompressed straight into the result: one allocation of the declared size."""
    size = declared_size(text, where)
    if size % (8 * columns):
        raise CorruptCheckpointError(f"{where} is not a table of {columns} int64 columns",
                                     file=MANIFEST_NAME)
    out = np.empty(size // 8, "<i8")
    try:
        packed = base64.b64decode(text, validate=True)
        with _zstd()[1].stream_reader(packed, read_across_frames=False) as frame:
            view, got = memoryview(out).cast("B"), 0
            while got < size:
                n = frame.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != size or frame.read(1):  # short, or more than one frame
                raise ValueError("decoded size differs from the declared one")
    except (binascii.Error, ValueError, zstandard.ZstdError) as exc:
        raise CorruptCheckpointError(f"{where} is not a base64 zstd frame of the table: {exc}",
                                     file=MANIFEST_NAME) from None
    return out.reshape(-1, columns).astype(np.int64, copy=False)


def _unsafe(where: str, msg: str):
    return UnsafeCheckpointError(f"{MANIFEST_NAME}: {where}: {msg}")


def decode_entries(items: list[tuple[str, dict, DType, tuple]], file_sizes: np.ndarray,
                   chains: list[tuple[int, int]]) -> list[TensorEntry]:
    """Validated TensorEntries from ``(key, JSON entry, dtype, shape)`` items.

    Every rule is checked for all the tensors at once (a manifest of thousands of small tensors
    would otherwise pay a few dozen numpy calls per tensor); an error names the first tensor that
    breaks the first rule found broken.
    """
    entries = []
    for key, raw, dtype, shape in items:
        where, nd = f"tensor {key!r}", len(shape)
        if math.prod(shape) > MAX_VALUE or max(shape, default=0) > MAX_VALUE:
            raise _unsafe(where, f"absurd shape {shape}")
        shards = decode(raw["shards"], 2 * nd + 1, f"{where} shards")
        chunks = decode(raw["chunks"], 7, f"{where} chunks")
        entries.append(TensorEntry(dtype, shape, shards[:, :2 * nd], shards[:, 2 * nd], chunks))
    check_entries([key for key, *_ in items], entries, file_sizes, chains)
    return entries


def check_entries(keys: list[str], entries: list[TensorEntry], file_sizes: np.ndarray,
                  chains: list[tuple[int, int]], chunks: bool = True) -> None:
    """Every table rule of FORMAT.md 3.3 for ``entries`` at once: shards inside the tensor,
    chunks inside their files, chunks tiling their shard, shards covering their tensor once.
    A save runs it before committing too, so a manifest no reader would accept is never
    committed. ``chunks`` False checks the shards alone (a revision 1.4 layout, whose chunk
    rows live in the index files)."""
    if entries:
        batch = _Batch(keys, entries)
        _check_shards(batch)
        if chunks:
            _check_chunks(batch, file_sizes, chains)
            _check_tiling(batch)
        _check_cover(batch)


class _Batch:
    """The tables of many tensors concatenated, with the owner of every shard and chunk row.

    Boxes are padded to the largest rank (offset 0, size 1 in the missing dimensions), which
    changes no rule: a padded dimension lies inside a shape of 1 and multiplies volumes by 1.
    """

    def __init__(self, keys: list[str], entries: list[TensorEntry]):
        self.keys, self.shapes = keys, [t.shape for t in entries]
        tensors = np.arange(len(entries))
        self.nshards = np.array([len(t.counts) for t in entries], np.int64)
        self.nchunks = np.array([len(t.chunks) for t in entries], np.int64)
        self.itemsize = np.array([t.dtype.itemsize for t in entries], np.int64)
        self.numel = np.array([math.prod(t.shape) for t in entries], np.int64)
        self.shard_owner = np.repeat(tensors, self.nshards)
        self.row_owner = np.repeat(tensors, self.nchunks)
        self.first_shard = np.concatenate([[0], np.cumsum(self.nshards)])
        self.counts = _concat([t.counts for t in entries], (0,))
        self.chunks = _concat([t.chunks for t in entries], (0, 7))
        nd = max(len(shape) for shape in self.shapes)
        shapes = np.ones((len(entries), nd), np.int64)
        self.offs = np.zeros((len(self.counts), nd), np.int64)
        self.sizes = np.ones((len(self.counts), nd), np.int64)
        for d in {len(shape) for shape in self.shapes} - {0}:  # one copy per distinct rank
            group = [i for i, shape in enumerate(self.shapes) if len(shape) == d]
            shapes[group, :d] = np.array([self.shapes[i] for i in group], np.int64)
            rows = np.concatenate([np.arange(self.first_shard[i], self.first_shard[i + 1])
                                   for i in group])
            boxes = _concat([entries[i].boxes for i in group], (0, 2 * d))
            self.offs[rows, :d], self.sizes[rows, :d] = boxes[:, :d], boxes[:, d:]
        self.shape = shapes[self.shard_owner]  # each shard's tensor shape, padded

    def owner(self, bad: np.ndarray, owner: np.ndarray | None) -> int:
        """The tensor owning the first true entry of ``bad`` (``owner`` None: one per tensor)."""
        index = int(np.argmax(bad))
        return index if owner is None else int(owner[index])

    def fail(self, bad: np.ndarray, owner: np.ndarray | None, msg: str):
        """Raise ``msg`` for the tensor owning the first true entry of ``bad``."""
        raise _unsafe(f"tensor {self.keys[self.owner(bad, owner)]!r}", msg)


def _concat(arrays: list[np.ndarray], empty_shape: tuple) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(empty_shape, np.int64)


def _segment_sums(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sums of consecutive runs of ``values`` of the given lengths (exact int64, empty runs 0)."""
    ends = np.concatenate([[0], np.cumsum(values)])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return ends[bounds[1:]] - ends[bounds[:-1]]


def _check_shards(b: _Batch) -> None:
    bad = (b.offs < 0).any(axis=1) | (b.sizes < 0).any(axis=1) | (b.counts < 0)
    if bad.any():
        b.fail(bad, b.shard_owner, "negative shard offset, size or chunk count")
    bad = ((b.offs > b.shape) | (b.sizes > b.shape) | (b.offs + b.sizes > b.shape)).any(axis=1)
    if bad.any():
        shape = b.shapes[b.owner(bad, b.shard_owner)]
        b.fail(bad, b.shard_owner, f"a shard lies outside the shape {shape}")
    # No shard can own more rows than the table has (this also keeps the sums below exact).
    bad = b.counts > b.nchunks[b.shard_owner]
    if bad.any():
        b.fail(bad, b.shard_owner, "shard chunk counts do not add up to the chunk table")
    bad = _segment_sums(b.counts, b.nshards) != b.nchunks
    if bad.any():
        b.fail(bad, None, "shard chunk counts do not add up to the chunk table")
    bad = (b.nshards == 0) & (b.numel > 0)
    if bad.any():
        b.fail(bad, None, "a non-empty tensor without shards")


def _check_chunks(b: _Batch, file_sizes: np.ndarray, chains) -> None:
    if not len(b.chunks):
        return
    file, offset, length, start, count, codec, crc = b.chunks.T
    itemsize = b.itemsize[b.row_owner]
    limit = knobs.get("max_chunk_bytes")
    # One combined test first (cheap when all is well); the message comes after.
    known = (file >= 0) & (file < len(file_sizes)) & (codec >= 0) & (codec < len(chains))
    fields = ((offset >= HEADER_BYTES) & (length >= 1) & (start >= 0) & (count >= 1)
              & (crc >= 0) & (crc <= 0xFFFFFFFF) & (offset <= MAX_VALUE)
              & (length <= MAX_VALUE) & (count <= limit // itemsize))
    if not (known & fields).all():
        b.fail(~(known & fields), b.row_owner,
               "a chunk names a missing file or codec, or has a negative, zero or absurd field "
               f"(decoded chunks are limited to {limit} bytes)")
    bad = offset + length > file_sizes[file]
    if bad.any():
        b.fail(bad, b.row_owner, "a chunk's bytes lie outside its data file")
    kinds = np.array([k for k, _ in chains], np.int64)[codec]
    shuffle = np.array([s for _, s in chains], np.int64)[codec]
    raw = count * itemsize
    plain = (kinds == codecs.RAW) | (kinds == codecs.SHUFFLE)
    bad = plain & (length != raw)
    if bad.any():
        b.fail(bad, b.row_owner, "an unencoded chunk does not store exactly its raw bytes")
    bad = ~plain & (raw > length * MAX_ZSTD_RATIO)
    if bad.any():
        b.fail(bad, b.row_owner, "a zstd chunk claims more raw bytes than any frame of its "
                                 "length can hold (a decompression bomb)")
    shuffled = (kinds == codecs.SHUFFLE) | (kinds == codecs.SHUFFLE_ZSTD)
    bad = shuffled & (raw % shuffle != 0)
    if bad.any():
        b.fail(bad, b.row_owner, "a shuffled chunk is not a whole number of elements")


def _check_tiling(b: _Batch) -> None:
    """Each shard's chunks, ordered by start, tile its elements exactly once."""
    shard = np.repeat(np.arange(len(b.counts)), b.counts)  # rows are stored shard after shard
    order = np.lexsort((b.chunks[:, 3], shard))
    start, count, shard = b.chunks[order, 3], b.chunks[order, 4], shard[order]
    before = np.cumsum(count) - count  # elements in earlier rows of the whole table
    first = np.concatenate([[0], np.cumsum(b.counts)])[:-1]
    base_of = np.zeros(len(b.counts), np.int64)
    base_of[b.counts > 0] = before[first[b.counts > 0]]  # ... at each non-empty shard's first row
    bad = start != before - base_of[shard]
    if bad.any():
        b.fail(bad, b.shard_owner[shard], "chunks do not tile their shard (gap or overlap)")
    bad = _segment_sums(count, b.counts) != np.prod(b.sizes, axis=1)
    if bad.any():
        b.fail(bad, b.shard_owner, "chunks do not cover their shard")


def _check_cover(b: _Batch) -> None:
    """The shards cover each tensor exactly once: volumes add up and no two overlap."""
    volume = np.prod(b.sizes, axis=1)  # 0 for an empty shard; 1 for the shard of a 0-dim tensor
    bad = _segment_sums(volume, b.nshards) != b.numel
    if bad.any():
        b.fail(bad, None, "shards do not cover the tensor exactly")
    several = np.flatnonzero(_segment_sums((volume > 0).astype(np.int64), b.nshards) > 1)
    for t in several:  # rare outside distributed checkpoints; each tensor checked on its own
        rows, nd = slice(b.first_shard[t], b.first_shard[t + 1]), len(b.shapes[t])
        keep = volume[rows] > 0
        if _overlap(b.offs[rows][keep, :nd], b.sizes[rows][keep, :nd]):
            raise _unsafe(f"tensor {b.keys[t]!r}", "shards overlap")


def _overlap(offs: np.ndarray, sizes: np.ndarray) -> bool:
    ends = offs + sizes
    varying = [d for d in range(offs.shape[1])
               if not ((offs[:, d] == offs[0, d]).all() and (ends[:, d] == ends[0, d]).all())]
    if len(varying) <= 1:  # e.g. Shard(0): intervals along one dimension
        d = varying[0] if varying else 0
        order = np.argsort(offs[:, d], kind="stable")
        return bool((offs[order[1:], d] < ends[order[:-1], d]).any())
    if len(offs) <= PAIRWISE_LIMIT:
        lo, hi = offs[:, None, :], ends[:, None, :]
        hit = np.all((lo < ends[None]) & (offs[None] < hi), axis=2)
        np.fill_diagonal(hit, False)
        return bool(hit.any())
    cuts = [np.unique(np.concatenate([offs[:, d], ends[:, d]])) for d in range(offs.shape[1])]
    if math.prod(len(c) - 1 for c in cuts) > MAX_GRID_CELLS:
        raise UnsafeCheckpointError(f"{MANIFEST_NAME}: shard layout too irregular to verify")
    grid = np.zeros([len(c) - 1 for c in cuts], np.int32)
    lo = [np.searchsorted(c, offs[:, d]) for d, c in enumerate(cuts)]
    hi = [np.searchsorted(c, ends[:, d]) for d, c in enumerate(cuts)]
    for i in range(len(offs)):
        grid[tuple(slice(lo[d][i], hi[d][i]) for d in range(len(cuts)))] += 1
    return bool((grid > 1).any())
