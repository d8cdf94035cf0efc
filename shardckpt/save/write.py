"""Encode and write one data file through the codec backend (native core, or the reference).

The backend runs the whole staging pipeline (bounded pool -> shuffle -> zstd -> crc32c ->
positional writes -> fsync) with the GIL released; this module prepares its arguments, interns
the resulting codec chains into the manifest's codec table and names failures.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import codecs, knobs
from ..codecs.status import raise_for
from ..types import FILE_HEADER, ChunkRef, ChunkSource


@dataclass(frozen=True)
class WriteOptions:
    """How chunks are encoded and written; ``None`` fields take their knob (knobs.py)."""

    codec: str = "auto"
    level: int = 1
    chunk_bytes: int = 4 << 20
    pool_bytes: int = 256 << 20
    encode_threads: int = 0
    write_threads: int = 1
    files_per_rank: int = 2
    durable: bool = True
    content_hashes: bool = False  # hash every chunk so later saves can reference it (refs.py)

    @classmethod
    def resolve(cls, **overrides) -> "WriteOptions":
        values = {name: knobs.get(name if name != "level" else "zstd_level")
                  for name in ("codec", "level", "chunk_bytes", "pool_bytes", "encode_threads",
                               "write_threads", "files_per_rank")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        opts = cls(**values)
        if opts.codec not in codecs.POLICIES:
            raise ValueError(f"codec must be one of {codecs.POLICIES}, not {opts.codec!r}")
        if opts.chunk_bytes < 1 or opts.pool_bytes < 1 or opts.files_per_rank < 1:
            raise ValueError("chunk_bytes, pool_bytes and files_per_rank must be positive")
        return opts


class CodecTable:
    """The manifest's list of codec chains; each distinct chain is stored once."""

    def __init__(self):
        self.chains: list[tuple[dict, ...]] = []
        self._index: dict[str, int] = {}

    def intern(self, chain: tuple[dict, ...]) -> int:
        key = repr(chain)
        if key not in self._index:
            self._index[key] = len(self.chains)
            self.chains.append(chain)
        return self._index[key]


def _write_one(path: str, rel: str, sources: list[ChunkSource], opts: WriteOptions,
               pool_bytes: int, encode_threads: int, known: bytes = b"") -> tuple[list, int, dict]:
    chunks = [(s.ptr, s.nbytes, s.shuffle_size) for s in sources]
    status, records, stats = codecs.backend.write_file(
        path, chunks, opts.codec, opts.level, encode_threads, opts.write_threads, pool_bytes,
        opts.durable, FILE_HEADER, opts.content_hashes, known)
    raise_for(status, file=rel, describe=lambda i: (sources[i].key, None))
    return records, stats.get("file_size") or os.path.getsize(path), stats


def _split(sources: list[ChunkSource], n: int) -> list[list[int]]:
    """Chunk indices for ``n`` files, balanced by bytes (each chunk to the lightest file)."""
    groups, load = [[] for _ in range(n)], [0] * n
    for i, src in enumerate(sources):
        j = load.index(min(load))
        groups[j].append(i)
        load[j] += src.nbytes
    return [g for g in groups if g]


def write_data_files(files: list[tuple[str, str]], sources: list[ChunkSource],
                     opts: WriteOptions, table: CodecTable, write_one=None,
                     known: bytes = b"", hashes: list | None = None
                     ) -> tuple[list[ChunkRef], list[int], dict]:
    """Write ``sources`` into up to ``len(files)`` new files concurrently.

    ``files`` holds ``(real path, checkpoint-relative name)`` pairs. Returns the chunk refs (in
    the order of ``sources``; ``ChunkRef.file`` indexes ``files``), each used file's size (unused
    trailing files are not created: their size list is shorter) and summed statistics. Several
    files fill the page cache from several cores (a file system serializes buffered writes to
    one file); the pool budget and the cores are shared out between them. ``write_one`` replaces
    the local file writer (object stores: ``upload.write_one`` with ``files`` naming storage
    paths). With ``opts.content_hashes`` the encoders hash every chunk into ``hashes`` (16
    bytes each, in the order of ``sources``) and skip those whose hash is in ``known``: their
    ref is None (an incremental save references them instead). Raises DiskFullError,
    StorageError.
    """
    write_one = write_one or _write_one
    groups = _split(sources, len(files)) or [[]]
    pool = max(opts.pool_bytes // len(groups), 1)
    threads = opts.encode_threads or max(1, (os.cpu_count() or 1) // len(groups))
    with ThreadPoolExecutor(len(groups)) as ex:  # the native calls release the GIL
        futures = [ex.submit(write_one, *files[i], [sources[k] for k in g], opts, pool, threads,
                             known) for i, g in enumerate(groups)]
        results = [f.result() for f in futures]
    refs: list = [None] * len(sources)
    if hashes is not None:
        hashes[:] = [None] * len(sources)
    for file_index, (group, (records, _, _)) in enumerate(zip(groups, results)):
        for k, record in zip(group, records):
            offset, length, kind, crc = record[:4]
            if hashes is not None and opts.content_hashes:
                hashes[k] = record[4]
            if length == 0:  # reused: its hash was known, nothing was written
                continue
            src = sources[k]
            codec = table.intern(codecs.chain_for(kind, src.shuffle_size, opts.level))
            refs[k] = ChunkRef(file_index, offset, length, src.start, src.count, codec, crc)
    stats: dict = {}
    for _, _, st in results:
        add_stats(stats, st, concurrent=True)
    return refs, [size for _, size, _ in results], stats


def add_stats(total: dict, more: dict, concurrent: bool) -> None:
    """Sum pipeline statistics into ``total``; wall time is the longest of concurrent calls
    and the sum of consecutive ones."""
    for key, value in more.items():
        if key == "wall_seconds" and concurrent:
            total[key] = max(total.get(key, 0), value)
        else:
            total[key] = total.get(key, 0) + value
