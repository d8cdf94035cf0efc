"""Per-rank chunk index files (FORMAT.md 3.7, revision 1.4): the chunk rows, out of the manifest.

Each rank writes ``data/rank-NNNNN.idx`` next to its data files: the rows of every chunk it
wrote, each naming the tensor (its position in the manifest's ``tensors``) and shard (its
position in that tensor's shards) it belongs to. The coordinator only lists the file (size and
CRC-32C) in the manifest, so its work and the manifest's size do not grow with the chunks.
A reader parses an index as untrusted input, like the manifest, and ``join`` turns a revision
1.4 manifest into the same ``TensorEntry`` tables a 1.3 manifest holds, which every rule of
FORMAT.md 3.3 is then checked on.
"""

from __future__ import annotations

import json

import numpy as np

from . import budget, tables
from .. import codecs
from .grid import layout_boxes
from ..errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from ..types import (DATA_DIR, HEADER_BYTES, MANIFEST_NAME, IndexEntry, Manifest, TensorEntry,
                     TensorLayout)

FORMAT = "shardckpt-index"
COLUMNS = 9  # tensor, shard, then the 7 chunk columns of FORMAT.md 3.3
CRC_MEMBER = b',"index_crc32c":'
MAX_INDEX_BYTES = 1 << 30


def index_path(rank: int) -> str:
    return f"{DATA_DIR}/rank-{rank:05d}.idx"


def to_bytes(rank: int, files: list[str], chains: list, rows: np.ndarray) -> bytes:
    """An index file's bytes: ``rows`` (n, 9) whose file and codec columns index ``files`` (this
    rank's data file paths) and ``chains``; checksummed like the manifest."""
    doc = {"format": FORMAT, "version": 1, "rank": rank, "files": files,
           "codecs": [list(c) for c in chains], "rows": tables.encode(rows.reshape(-1, COLUMNS))}
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()[:-1]
    return body + CRC_MEMBER + str(codecs.backend.crc32c(body)).encode() + b"}"


def parse(data: bytes, entry: IndexEntry) -> tuple[list[str], list, np.ndarray]:
    """``(files, codec chains, rows)`` of an index file, after checking its size and checksum
    against the manifest's entry and its own, and its structure.

    Raises:
        CorruptCheckpointError: naming the index file, for any breach.
    """
    files, chains, text = head(data, entry)
    return files, chains, rows_of(text, entry)


def head(data: bytes, entry: IndexEntry) -> tuple[list[str], list, str]:
    """``(files, codec chains, rows text)`` of an index file, checked as ``parse`` checks it but
    with its rows table still encoded (``rows_of``; ``declared_rows`` counts them first)."""
    def bad(msg):
        return CorruptCheckpointError(f"chunk index: {msg}", file=entry.path)
    if len(data) != entry.size:
        raise bad(f"has {len(data)} bytes, the manifest says {entry.size}")
    if codecs.backend.crc32c(data) != entry.crc:
        raise bad("checksum differs from the manifest's")
    at = data.rfind(CRC_MEMBER)
    tail = data[at + len(CRC_MEMBER):] if at >= 0 else b""
    if at < 0 or not tail[:-1].isdigit() or not tail.endswith(b"}") \
            or int(tail[:-1]) != codecs.backend.crc32c(data[:at]):
        raise bad("own checksum member missing or wrong")
    try:
        doc = json.loads(data[:at] + b"}")
    except (ValueError, RecursionError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != 1 \
            or doc.get("rank") != entry.rank or not isinstance(doc.get("files"), list) \
            or not all(isinstance(f, str) for f in doc["files"]) \
            or not isinstance(doc.get("codecs"), list):
        raise bad("not a version 1 index of this rank (format, version, rank, files, codecs)")
    try:
        for c in doc["codecs"]:
            codecs.kind_of(c)
    except CheckpointError as exc:
        raise bad(str(exc)) from None
    return doc["files"], doc["codecs"], doc.get("rows")


def declared_rows(text, entry: IndexEntry) -> int:
    """How many rows the rows table ``text`` declares, from its frame header alone."""
    try:
        size = tables.declared_size(text, "rows")
    except CheckpointError as exc:
        raise CorruptCheckpointError(f"chunk index: {exc}", file=entry.path) from None
    return size // (8 * COLUMNS)


def rows_of(text, entry: IndexEntry) -> np.ndarray:
    """The decoded rows table of an index file."""
    try:
        return tables.decode(text, COLUMNS, "rows")
    except CheckpointError as exc:
        raise CorruptCheckpointError(f"chunk index: {exc}", file=entry.path) from None


BUNDLE_MAGIC = b"SHRDCKPTBUNDLE1\n"  # never the start of a manifest, which is "{"


def bundle(manifest: bytes, indexes: list[bytes]) -> bytes:
    """The manifest's bytes and its index files' in one blob: the magic, the part count and
    each part's length (little-endian u64), then the parts."""
    parts = [manifest] + indexes
    head = np.array([len(parts)] + [len(p) for p in parts], "<u8").tobytes()
    return BUNDLE_MAGIC + head + b"".join(parts)


def unbundle(data: bytes) -> tuple[bytes, list[bytes] | None]:
    """``(manifest bytes, index bytes in manifest order)`` of a bundle, or ``(data, None)``
    for plain manifest bytes. A malformed bundle is CorruptCheckpointError."""
    if not data.startswith(BUNDLE_MAGIC):
        return data, None
    at = len(BUNDLE_MAGIC)
    bad = CorruptCheckpointError("malformed manifest bundle", file="manifest.json")
    if len(data) < at + 8:
        raise bad
    count = int(np.frombuffer(data, "<u8", 1, at)[0])
    if not 1 <= count <= (len(data) - at) // 8 - 1:
        raise bad
    sizes = np.frombuffer(data, "<u8", count, at + 8).astype(np.int64)
    start = at + 8 * (count + 1)
    if (sizes < 0).any() or start + int(sizes.sum()) != len(data):
        raise bad
    ends = start + np.cumsum(sizes)
    parts = [data[e - n:e] for e, n in zip(ends.tolist(), sizes.tolist())]
    return parts[0], parts[1:]


def join(m: Manifest, read, data_bytes=None, manifest_size: int = 0) -> Manifest:
    """Manifest ``m`` (revision 1.4, TensorLayouts) with every tensor's chunk rows gathered from
    its index files, as a ``Manifest`` of TensorEntries; ``read(i, entry)`` returns the bytes
    of index ``i``. The codec chains of all indexes are interned into the result's ``codecs``.

    Before any grid cell is built or any rows table decoded, what they will take is totalled
    over the whole manifest and every index (budget.py) against ``manifest_size``, the index
    bytes and, if those do not cover it, the data files' sizes as ``data_bytes(files)`` checks
    them on disk (None: the recorded sizes).

    Raises:
        CorruptCheckpointError: an index is missing, damaged, or names a tensor, shard, file
            or codec that does not exist.
        UnsafeCheckpointError: an index declares more rows than its data files have bytes.
        MetadataBudgetError: the total exceeds the budget.
    """
    keys = list(m.tensors)
    layouts: list[TensorLayout] = list(m.tensors.values())
    file_ids = {f.path: i for i, f in enumerate(m.files) if f.base is None}
    heads, metadata = [], manifest_size
    for i, entry in enumerate(m.indexes):
        data = read(i, entry)
        metadata += len(data)
        files, index_chains, text = head(data, entry)
        del data
        try:
            fmap = np.array([file_ids[p] for p in files], np.int64)
        except KeyError as exc:
            raise CorruptCheckpointError(f"chunk index names data file {exc} the manifest does "
                                         "not list", file=entry.path) from None
        heads.append((entry, fmap, index_chains, text, _rows_within(m, entry, fmap, text)))
    _check_budget(m, layouts, [h[-1] for h in heads], metadata, data_bytes)
    boxes = [layout_boxes(t) for t in layouts]
    first = np.concatenate([[0], np.cumsum([len(b) for b in boxes])]).astype(np.int64)
    chain_ids = {}
    rows = np.empty((sum(h[-1] for h in heads), 8), np.int64)
    at = 0
    for entry, fmap, index_chains, text, n in heads:
        cmap = np.array([chain_ids.setdefault(json.dumps(c, sort_keys=True), len(chain_ids))
                         for c in index_chains], np.int64)
        _place(rows[at:at + n], rows_of(text, entry), entry, first, fmap, cmap, len(keys))
        at += n
    rows = rows[np.lexsort((rows[:, 4], rows[:, 0]))]  # shard after shard, by start
    counts = np.bincount(rows[:, 0], minlength=int(first[-1]))
    at = np.searchsorted(rows[:, 0], first)
    tensors = {key: TensorEntry(t.dtype, t.shape, b, counts[first[k]:first[k + 1]].copy(),
                                rows[at[k]:at[k + 1], 1:])
               for k, (key, t, b) in enumerate(zip(keys, layouts, boxes))}
    return Manifest(world_size=m.world_size, files=m.files, codecs=tuple(
        tuple(c) for c in _ordered(chain_ids)), tensors=tensors, tree=m.tree,
        metadata=m.metadata, writer=m.writer, created_unix=m.created_unix,
        rank_overrides=m.rank_overrides, name=m.name, indexes=m.indexes)


def _rows_within(m: Manifest, entry: IndexEntry, fmap: np.ndarray, text) -> int:
    """The rows ``text`` declares, refused if more than its data files could hold: every chunk
    stores at least one byte after the file header, and chunks do not overlap (FORMAT.md 2)."""
    n = declared_rows(text, entry)
    capacity = sum(m.files[f].size - HEADER_BYTES for f in set(fmap.tolist())) if n else 0
    if n > capacity:
        raise UnsafeCheckpointError(f"chunk index {entry.path} declares {n} chunk rows, more "
                                    f"than its data files' {capacity} bytes can hold")
    return n


def _check_budget(m: Manifest, layouts: list, nrows: list[int], metadata: int,
                  data_bytes) -> None:
    """Every shard box (grid cells included) and chunk row ``join`` builds, totalled against
    the bytes on disk before it builds any (budget.py)."""
    ndim = max((len(t.shape) for t in layouts), default=0)
    shards = sum(budget.grid_cells(t.splits) if t.splits is not None else len(t.boxes)
                 for t in layouts)
    claim = budget.shard_claim(shards, ndim) + budget.chunk_claim(sum(nrows))
    budget.check(claim, metadata, m.files, data_bytes, MANIFEST_NAME)


def _place(out: np.ndarray, rows: np.ndarray, entry: IndexEntry, first: np.ndarray,
           fmap: np.ndarray, cmap: np.ndarray, ntensors: int) -> None:
    """Write an index's decoded ``rows`` into ``out`` as joined rows: the global shard number,
    then the chunk columns, file and codec mapped (``fmap``, ``cmap``) to the manifest's."""
    tensor, shard, file, codec = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 7]
    ok = ((tensor >= 0) & (tensor < ntensors) & (file >= 0) & (file < len(fmap))
          & (codec >= 0) & (codec < len(cmap)))
    ok[ok] &= (shard[ok] >= 0) & (shard[ok] < first[tensor[ok] + 1] - first[tensor[ok]])
    if not ok.all():
        raise CorruptCheckpointError("chunk index row names a tensor, shard, data file or codec "
                                     "that does not exist", file=entry.path)
    out[:] = rows[:, 1:]
    out[:, 0] = first[tensor] + shard  # the global shard number, sorted on below
    out[:, 1], out[:, 6] = fmap[file], cmap[codec]


def _ordered(chain_ids: dict) -> list:
    return [json.loads(text) for text, _ in sorted(chain_ids.items(), key=lambda kv: kv[1])]
