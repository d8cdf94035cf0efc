"""The manifest (FORMAT.md 3): serialize it, and parse it as untrusted input.

``parse`` checks every rule of FORMAT.md before any data is touched, so a reader never follows a
path outside the checkpoint, never allocates more than the shapes imply and never meets an unknown
codec halfway through a load.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from . import budget, grid, refs, tables
from .. import codecs
from .._version import __version__
from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from .tree import tensor_keys
from ..types import (DTYPES, FORMAT_NAME, FORMAT_VERSION, HEADER_BYTES, MANIFEST_NAME, FileEntry,
                     IndexEntry, Manifest, TensorLayout)

MAX_MANIFEST_BYTES = 1 << 30
MAX_NUMEL = 1 << 53
FILE_PATH = re.compile(r"data/[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def to_json(m: Manifest) -> bytes:
    """The manifest's bytes, as FORMAT.md 3 lays them out."""
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "writer": m.writer or {"name": "shardckpt", "version": __version__},
        "created_unix": m.created_unix,
        "world_size": m.world_size,
        "checksum": "crc32c",
        "files": [_file_json(f) for f in m.files],
        "codecs": [list(c) for c in m.codecs],
        "tensors": {key: {"dtype": t.dtype.name, "shape": list(t.shape), **_tables_json(t)}
                    for key, t in m.tensors.items()},
        "tree": m.tree,
        "metadata": m.metadata,
    }
    if _indexed(m):
        doc["indexes"] = [{"path": i.path, "size": i.size, "rank": i.rank, "crc32c": i.crc}
                          for i in m.indexes]
    if m.rank_overrides:
        doc["rank_overrides"] = [list(o) for o in m.rank_overrides]
    if m.hashes is not None:
        doc["content_hashes"] = refs.hashes_json(m.hashes)
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()[:-1]
    return body + CRC_MEMBER + str(codecs.backend.crc32c(body)).encode() + b"}"


def _indexed(m: Manifest) -> bool:
    """Whether ``m`` is written in the revision 1.4 form: layouts here, chunk rows in indexes.
    A joined manifest (TensorEntries) is written inline, as revision 1.3 lays it out."""
    return m.indexes is not None and all(isinstance(t, TensorLayout) for t in m.tensors.values())


def _tables_json(t) -> dict:
    if not isinstance(t, TensorLayout):
        return tables.encode_entry(t)
    if t.splits is not None:
        return {"grid": [list(s) for s in t.splits]}
    return {"boxes": tables.encode(t.boxes)}


def _file_json(f: FileEntry) -> dict:
    doc = {"path": f.path, "size": f.size, "rank": f.rank}
    if f.base is not None:
        doc["base"] = f.base
    return doc


CRC_MEMBER = b',"manifest_crc32c":'


def _check_crc(data: bytes) -> bytes:
    """The manifest without its checksum member, after checking it (FORMAT.md 3)."""
    at = data.rfind(CRC_MEMBER)
    tail = data[at + len(CRC_MEMBER):]
    if at < 0 or not tail.endswith(b"}") or not tail[:-1].isdigit():
        raise CorruptCheckpointError("manifest checksum member missing or damaged",
                                     file=MANIFEST_NAME)
    actual, stored = codecs.backend.crc32c(data[:at]), int(tail[:-1])
    if actual != stored:
        raise CorruptCheckpointError(f"manifest checksum mismatch: stored {stored:#010x}, "
                                     f"computed {actual:#010x}", file=MANIFEST_NAME)
    return data[:at] + b"}"


def _unsafe(msg: str):
    return UnsafeCheckpointError(f"{MANIFEST_NAME}: {msg}")


def _int(value, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _unsafe(f"{what} must be an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise _unsafe(f"{what} must be a list of at most 64 integers")
    return tuple(_int(v, what) for v in value)


def _parse_files(raw) -> tuple[FileEntry, ...]:
    if not isinstance(raw, list):
        raise _unsafe("files must be a list")
    files, seen = [], set()
    for i, f in enumerate(raw):
        if not isinstance(f, dict) or not {"path", "size", "rank"} <= set(f) <= \
                {"path", "size", "rank", "base"}:
            raise _unsafe(f"files[{i}] must have exactly path, size, rank and optionally base "
                          f"(got {f!r:.120})")
        path, base = f["path"], refs.check_base_name(f.get("base"), f"files[{i}].base")
        if not isinstance(path, str) or not FILE_PATH.fullmatch(path) or (base, path) in seen:
            raise _unsafe(f"files[{i}].path {path!r:.120} is not a unique data/<name> path")
        seen.add((base, path))
        files.append(FileEntry(path, _int(f["size"], f"files[{i}].size", HEADER_BYTES),
                               _int(f["rank"], f"files[{i}].rank", 0, 1 << 24), base))
    return tuple(files)


def _tensor_header(key, raw) -> tuple:
    """``(key, raw, dtype, shape)`` of a tensor entry whose JSON fields are checked; its tables
    are decoded and checked for all tensors at once (tables.decode_entries)."""
    where = f"tensor {key!r}"
    if not isinstance(raw, dict) or set(raw) not in ({"dtype", "shape", "shards", "chunks"},
                                                     {"dtype", "shape", "grid"},
                                                     {"dtype", "shape", "boxes"}):
        raise _unsafe(f"{where}: an entry has exactly dtype, shape, and shards and chunks "
                      "(or, with indexes, grid or boxes)")
    dtype = DTYPES.get(raw["dtype"]) if isinstance(raw["dtype"], str) else None
    if dtype is None:
        raise _unsafe(f"{where}: unknown dtype {raw['dtype']!r:.40}")
    shape = _ints(raw["shape"], f"{where} shape")
    if math.prod(shape) > MAX_NUMEL or any(d > MAX_NUMEL for d in shape):
        raise _unsafe(f"{where}: absurd shape {shape}")
    return key, raw, dtype, shape


def parse(data: bytes, data_bytes=None) -> Manifest:
    """Parse and validate manifest bytes; raises Corrupt/UnsafeCheckpointError on any breach.

    Its tables are totalled before any is decoded (budget.py): ``data_bytes(files)`` gives the
    data files' sizes checked on disk, asked for only when the manifest's own bytes do not cover
    the total; None trusts the recorded sizes (a writer checking its own manifest).

    Raises:
        MetadataBudgetError: the tables declare more than the bytes on disk allow.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise _unsafe(f"{len(data)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
    data = _check_crc(data)
    try:
        doc = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"not valid JSON: {exc}", file=MANIFEST_NAME) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError("not a shardckpt manifest", file=MANIFEST_NAME)
    if doc.get("format_version") != FORMAT_VERSION:
        raise _unsafe(f"format_version {doc.get('format_version')!r:.40} is not supported by "
                      f"this reader (it reads {FORMAT_VERSION})")
    required = {"world_size", "checksum", "files", "codecs", "tensors", "tree", "metadata"}
    if not required <= set(doc):
        raise CorruptCheckpointError(f"missing fields {sorted(required - set(doc))}",
                                     file=MANIFEST_NAME)
    if doc["checksum"] != "crc32c":
        raise _unsafe(f"unknown checksum {doc['checksum']!r:.40}")
    if not isinstance(doc["codecs"], list) or not isinstance(doc["tensors"], dict) \
            or not isinstance(doc["metadata"], dict):
        raise CorruptCheckpointError("codecs, tensors or metadata has the wrong type",
                                     file=MANIFEST_NAME)
    files = _parse_files(doc["files"])
    chains = [codecs.kind_of(c) for c in doc["codecs"]]
    sizes = np.array([f.size for f in files], dtype=np.int64)
    headers = [_tensor_header(k, v) for k, v in doc["tensors"].items()]
    indexes = _parse_indexes(doc.get("indexes"), files)
    budget.check(_claim(headers), len(data), files, data_bytes, MANIFEST_NAME)
    if indexes is None:
        if any("shards" not in raw for _, raw, _, _ in headers):
            raise _unsafe("a grid or boxes entry without indexes")
        tensors = dict(zip(doc["tensors"], tables.decode_entries(headers, sizes, chains)))
        _check_stored_bytes(files, tensors)
    else:
        if doc["codecs"] or "content_hashes" in doc:
            raise _unsafe("a manifest with indexes has no codecs and no content_hashes")
        tensors = dict(zip(doc["tensors"], _layouts(headers)))
    world_size = _int(doc["world_size"], "world_size", 1, 1 << 24)
    for key, t in tensors.items():
        if isinstance(t, TensorLayout) and t.boxes is not None and len(t.boxes) and \
                (t.boxes[:, -1].min() < 0 or t.boxes[:, -1].max() >= world_size):
            raise _unsafe(f"tensor {key!r}: a shard's writer is not a saving rank")
    overrides = _parse_overrides(doc.get("rank_overrides"), world_size)
    for tree in [doc["tree"]] + [node for _, own in overrides or () for _, node in own]:
        missing = {k for k in tensor_keys(tree) if k not in tensors}
        if missing:
            raise CorruptCheckpointError(f"state tree names unknown tensors "
                                         f"{sorted(missing)[:5]}", file=MANIFEST_NAME)
    return Manifest(world_size=world_size, files=files,
                    codecs=tuple(tuple(c) for c in doc["codecs"]), tensors=tensors,
                    tree=doc["tree"], metadata=doc["metadata"],
                    writer=doc.get("writer") if isinstance(doc.get("writer"), dict) else {},
                    created_unix=doc.get("created_unix", 0.0),
                    rank_overrides=overrides, indexes=indexes,
                    hashes=None if indexes is not None else
                    refs.parse_hashes(doc.get("content_hashes"), tensors))


def _claim(headers) -> int:
    """Bytes the manifest's own tables take once decoded, from their frame headers alone: the
    inline shard and chunk tables, or a revision 1.4 manifest's explicit boxes (its grid cells
    are built only when joined with the indexes, chunk_index.join, and counted there)."""
    ndim, total = max((len(shape) for *_, shape in headers), default=0), 0
    for key, raw, _, shape in headers:
        where = f"tensor {key!r}"
        for field in ("shards", "boxes"):
            if field in raw:
                rows = tables.declared_size(raw[field], f"{where} {field}") // (
                    8 * (2 * len(shape) + 1))
                total += budget.shard_claim(rows, ndim)
        if "chunks" in raw:
            total += budget.chunk_claim(tables.declared_size(raw["chunks"], f"{where} chunks")
                                        // (8 * 7))
    return total


def _parse_indexes(raw, files) -> tuple[IndexEntry, ...] | None:
    """``indexes`` (FORMAT.md 3.7): ``[{"path", "size", "rank", "crc32c"}, ...]``, paths of the
    section 1 pattern ending ``.idx``, unique and distinct from the data files'."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _unsafe("indexes must be a list")
    out, seen = [], {f.path for f in files if f.base is None}
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or set(e) != {"path", "size", "rank", "crc32c"}:
            raise _unsafe(f"indexes[{i}] must have exactly path, size, rank, crc32c")
        path = e["path"]
        if not isinstance(path, str) or not FILE_PATH.fullmatch(path) \
                or not path.endswith(".idx") or path in seen:
            raise _unsafe(f"indexes[{i}].path {path!r:.120} is not a unique data/<name>.idx path")
        seen.add(path)
        out.append(IndexEntry(path, _int(e["size"], f"indexes[{i}].size", 1, MAX_MANIFEST_BYTES),
                              _int(e["rank"], f"indexes[{i}].rank", 0, 1 << 24),
                              _int(e["crc32c"], f"indexes[{i}].crc32c", 0, 0xFFFFFFFF)))
    return tuple(out)


def _layouts(headers) -> list[TensorLayout]:
    """The TensorLayouts of a revision 1.4 manifest, explicit boxes checked to cover their
    tensor exactly once (chunk rows are checked once joined, chunk_index.join)."""
    out = []
    for key, raw, dtype, shape in headers:
        where = f"tensor {key!r}"
        if "grid" in raw:
            out.append(TensorLayout(dtype, shape, splits=grid.check_splits(raw["grid"], shape,
                                                                           where)))
        elif "boxes" in raw:
            out.append(TensorLayout(dtype, shape, boxes=tables.decode(
                raw["boxes"], 2 * len(shape) + 1, f"{where} boxes")))
        else:
            raise _unsafe(f"{where}: a manifest with indexes has grid or boxes entries")
    check_layouts(out, [k for k, *_ in headers])
    return out


def check_layouts(layouts: list[TensorLayout], keys: list[str]) -> None:
    """Grid rules are well formed (3.7); explicit boxes lie inside their tensor and cover it
    exactly once (3.3). A writer runs it before committing too."""
    for k, t in zip(keys, layouts):
        if t.splits is not None:
            grid.check_splits([list(s) for s in t.splits], t.shape, f"tensor {k!r}")
    explicit = [(k, t) for k, t in zip(keys, layouts) if t.splits is None]
    if explicit:
        entries = [_chunkless(t) for _, t in explicit]
        tables.check_entries([k for k, _ in explicit], entries, np.zeros(0, np.int64), [],
                             chunks=False)


def _chunkless(t: TensorLayout):
    """A chunkless TensorEntry of an explicit layout, for the shard checks of tables.py."""
    from ..types import TensorEntry
    return TensorEntry(t.dtype, t.shape, grid.layout_boxes(t), np.zeros(len(t.boxes), np.int64),
                       np.zeros((0, 7), np.int64))


def check_joined(m: Manifest) -> None:
    """Every rule of FORMAT.md 3.3 and 5 on a revision 1.4 manifest whose chunk rows were
    joined from its index files (chunk_index.join), as ``parse`` checks an inline one."""
    sizes = np.array([f.size for f in m.files], dtype=np.int64)
    tables.check_entries(list(m.tensors), list(m.tensors.values()), sizes, chain_kinds(m))
    _check_stored_bytes(m.files, m.tensors)


def _check_stored_bytes(files, tensors) -> None:
    """Chunks do not overlap (FORMAT.md 2), so a file's chunks store at most its size minus the
    header. Checked per file in one pass: it bounds the total a reader decodes by the bytes that
    really exist, where overlapping rows could name the same bytes millions of times."""
    rows = [t.chunks[:, :3] for t in tensors.values() if len(t.chunks)]
    if not rows:
        return
    rows = np.concatenate(rows)
    stored = np.bincount(rows[:, 0], weights=rows[:, 2], minlength=len(files))
    capacity = np.array([f.size - HEADER_BYTES for f in files], np.float64)
    if (stored > capacity).any():
        bad = files[int(np.argmax(stored > capacity))].path
        raise _unsafe(f"the chunks of {bad} add up to more bytes than the file holds "
                      "(overlapping chunks)")


def _parse_overrides(raw, world_size: int):
    """``rank_overrides`` (FORMAT.md 3.5): ``[[rank, [[path, node], ...]], ...]``."""
    if raw is None:
        return None
    bad = CorruptCheckpointError("rank_overrides must be [[rank, [[path, node], ...]], ...] "
                                 "with distinct ranks below world_size", file=MANIFEST_NAME)
    if not isinstance(raw, list):
        raise bad
    seen = set()
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                and not isinstance(entry[0], bool) and 0 <= entry[0] < world_size
                and entry[0] not in seen and isinstance(entry[1], list)
                and all(isinstance(o, list) and len(o) == 2 and isinstance(o[0], list)
                        for o in entry[1])):
            raise bad
        seen.add(entry[0])
    return tuple((r, own) for r, own in raw)


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name} is not JSON")


def check_complete(m: Manifest, where: str) -> None:
    """Refuse to commit a manifest a reader would refuse: every tensor covered exactly once by
    its shards, every chunk inside its file, the tree naming only saved tensors.

    Raises:
        UnsafeCheckpointError: naming ``where`` (the checkpoint) and the tensor at fault.
    """
    sizes = np.array([f.size for f in m.files], dtype=np.int64)
    try:
        if _indexed(m):
            check_layouts(list(m.tensors.values()), list(m.tensors))
        else:
            tables.check_entries(list(m.tensors), list(m.tensors.values()), sizes,
                                 [codecs.kind_of(c) for c in m.codecs])
        missing = {k for k in tensor_keys(m.tree) if k not in m.tensors}
        if missing:
            raise _unsafe(f"state tree names unknown tensors {sorted(missing)[:5]}")
    except (UnsafeCheckpointError, CorruptCheckpointError) as exc:
        raise UnsafeCheckpointError(f"{where}: refusing to commit a manifest no reader would "
                                    f"accept: {exc}") from None


def chain_kinds(m: Manifest) -> list[tuple[int, int]]:
    """``(kind, shuffle_size)`` for each codec chain of a parsed manifest."""
    return [codecs.kind_of(c) for c in m.codecs]
