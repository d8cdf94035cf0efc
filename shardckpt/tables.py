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

from . import codecs, knobs
from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .types import HEADER_BYTES, MANIFEST_NAME, DType, TensorEntry

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


def decode(text, columns: int, where: str) -> np.ndarray:
    """An int64 table from base64 text; CorruptCheckpointError names ``where`` if malformed."""
    if not isinstance(text, str):
        raise CorruptCheckpointError(f"{where} is not a base64 string", file=MANIFEST_NAME)
    try:
        packed = base64.b64decode(text, validate=True)
        size = zstandard.get_frame_parameters(packed).content_size
        if size > MAX_TABLE_BYTES:  # also ZSTD_CONTENTSIZE_UNKNOWN, a huge sentinel
            raise ValueError(f"declares {size} bytes")
        raw = _zstd()[1].decompress(packed, max_output_size=size)
        if len(raw) != size:
            raise ValueError("decoded size differs from the declared one")
    except (binascii.Error, ValueError, zstandard.ZstdError) as exc:
        raise CorruptCheckpointError(f"{where} is not a base64 zstd frame of the table: {exc}",
                                     file=MANIFEST_NAME) from None
    if len(raw) % (8 * columns):
        raise CorruptCheckpointError(f"{where} is not a table of {columns} int64 columns",
                                     file=MANIFEST_NAME)
    return np.frombuffer(raw, dtype="<i8").reshape(-1, columns).astype(np.int64)


def _unsafe(where: str, msg: str):
    return UnsafeCheckpointError(f"{MANIFEST_NAME}: {where}: {msg}")


def decode_entry(key: str, raw: dict, dtype: DType, shape: tuple, file_sizes: np.ndarray,
                 chains: list[tuple[int, int]]) -> TensorEntry:
    """A validated TensorEntry from the manifest's JSON entry."""
    where, nd = f"tensor {key!r}", len(shape)
    shards = decode(raw["shards"], 2 * nd + 1, f"{where} shards")
    chunks = decode(raw["chunks"], 7, f"{where} chunks")
    entry = TensorEntry(dtype, shape, shards[:, :2 * nd], shards[:, 2 * nd], chunks)
    _check_shards(entry, where)
    _check_chunks(entry, file_sizes, chains, where)
    _check_tiling(entry, where)
    _check_cover(entry, where)
    return entry


def _check_shards(t: TensorEntry, where: str) -> None:
    nd, shape = len(t.shape), np.asarray(t.shape, np.int64)
    if (t.boxes < 0).any() or (t.counts < 0).any():
        raise _unsafe(where, "negative shard offset, size or chunk count")
    offs, sizes = t.boxes[:, :nd], t.boxes[:, nd:]
    if (offs > shape).any() or (sizes > shape).any() or (offs + sizes > shape).any():
        raise _unsafe(where, f"a shard lies outside the shape {t.shape}")
    if int(t.counts.sum()) != len(t.chunks):
        raise _unsafe(where, "shard chunk counts do not add up to the chunk table")
    if not len(t.boxes) and math.prod(t.shape):
        raise _unsafe(where, "a non-empty tensor without shards")


def _check_chunks(t: TensorEntry, file_sizes: np.ndarray, chains, where: str) -> None:
    if not len(t.chunks):
        return
    file, offset, length, start, count, codec, crc = t.chunks.T
    limit = knobs.get("max_chunk_bytes")
    # One combined test first (cheap for the many small tensors); the message comes after.
    known = (file >= 0) & (file < len(file_sizes)) & (codec >= 0) & (codec < len(chains))
    fields = ((offset >= HEADER_BYTES) & (length >= 1) & (start >= 0) & (count >= 1)
              & (crc >= 0) & (crc <= 0xFFFFFFFF) & (offset <= MAX_VALUE)
              & (length <= MAX_VALUE) & (count <= limit // t.dtype.itemsize))
    if not (known & fields).all():
        raise _unsafe(where, "a chunk names a missing file or codec, or has a negative, zero "
                             f"or absurd field (decoded chunks are limited to {limit} bytes)")
    if (offset + length > file_sizes[file]).any():
        raise _unsafe(where, "a chunk's bytes lie outside its data file")
    kinds = np.array([k for k, _ in chains], np.int64)[codec]
    shuffle = np.array([s for _, s in chains], np.int64)[codec]
    raw = count * t.dtype.itemsize
    plain = (kinds == codecs.RAW) | (kinds == codecs.SHUFFLE)
    if (plain & (length != raw)).any():
        raise _unsafe(where, "an unencoded chunk does not store exactly its raw bytes")
    if (~plain & (raw > length * MAX_ZSTD_RATIO)).any():
        raise _unsafe(where, "a zstd chunk claims more raw bytes than any frame of its length "
                             "can hold (a decompression bomb)")
    shuffled = (kinds == codecs.SHUFFLE) | (kinds == codecs.SHUFFLE_ZSTD)
    if (shuffled & (raw % shuffle != 0)).any():
        raise _unsafe(where, "a shuffled chunk is not a whole number of elements")


def _check_tiling(t: TensorEntry, where: str) -> None:
    """Each shard's chunks, ordered by start, tile its elements exactly once."""
    nd = len(t.shape)
    shard = np.repeat(np.arange(len(t.counts)), t.counts)
    order = np.lexsort((t.chunks[:, 3], shard))
    start, count, shard = t.chunks[order, 3], t.chunks[order, 4], shard[order]
    before = np.cumsum(count) - count  # elements in earlier rows of the whole table
    base = before[t.first[:-1][t.counts > 0]]  # ... at each non-empty shard's first row
    base_of = np.zeros(len(t.counts), np.int64)
    base_of[t.counts > 0] = base
    if (start != before - base_of[shard]).any():
        raise _unsafe(where, "chunks do not tile their shard (gap or overlap)")
    covered = np.zeros(len(t.counts), np.int64)
    np.add.at(covered, shard, count)
    if (covered != np.prod(t.boxes[:, nd:], axis=1)).any():
        raise _unsafe(where, "chunks do not cover their shard")


def _check_cover(t: TensorEntry, where: str) -> None:
    """The shards cover the tensor exactly once: volumes add up and no two overlap."""
    nd = len(t.shape)
    sizes = t.boxes[:, nd:]
    keep = np.all(sizes > 0, axis=1)
    offs, sizes = t.boxes[keep, :nd], sizes[keep]
    if int(np.prod(sizes, axis=1).sum()) != math.prod(t.shape):  # 0-dim: exactly one shard
        raise _unsafe(where, "shards do not cover the tensor exactly")
    if len(offs) > 1 and _overlap(offs, sizes):
        raise _unsafe(where, "shards overlap")


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
