"""Encode and write one data file through the codec backend (native core, or the reference).

The backend runs the whole staging pipeline (bounded pool -> shuffle -> zstd -> crc32c ->
positional writes -> fsync) with the GIL released; this module prepares its arguments, interns
the resulting codec chains into the manifest's codec table and names failures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import codecs, knobs
from .status import raise_for
from .types import FILE_HEADER, ChunkRef, ChunkSource


@dataclass(frozen=True)
class WriteOptions:
    """How chunks are encoded and written; ``None`` fields take their knob (knobs.py)."""

    codec: str = "auto"
    level: int = 1
    chunk_bytes: int = 4 << 20
    pool_bytes: int = 256 << 20
    encode_threads: int = 0
    write_threads: int = 1
    durable: bool = True

    @classmethod
    def resolve(cls, **overrides) -> "WriteOptions":
        values = {name: knobs.get(name if name != "level" else "zstd_level")
                  for name in ("codec", "level", "chunk_bytes", "pool_bytes", "encode_threads",
                               "write_threads")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        opts = cls(**values)
        if opts.codec not in codecs.POLICIES:
            raise ValueError(f"codec must be one of {codecs.POLICIES}, not {opts.codec!r}")
        if opts.chunk_bytes < 1 or opts.pool_bytes < 1:
            raise ValueError("chunk_bytes and pool_bytes must be positive")
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


def write_data_file(path: str, rel: str, file_index: int, sources: list[ChunkSource],
                    opts: WriteOptions, table: CodecTable) -> tuple[list[ChunkRef], int, dict]:
    """Write ``sources`` into a new file at ``path``; ``(refs, file_size, stats)``.

    ``rel`` is the file's checkpoint-relative name for error messages. Raises DiskFullError,
    StorageError.
    """
    chunks = [(s.ptr, s.nbytes, s.shuffle_size) for s in sources]
    status, records, stats = codecs.backend.write_file(
        path, chunks, opts.codec, opts.level, opts.encode_threads, opts.write_threads,
        opts.pool_bytes, opts.durable, FILE_HEADER)
    raise_for(status, file=rel, describe=lambda i: (sources[i].key, None))
    refs = []
    for src, (offset, length, kind, crc) in zip(sources, records):
        codec = table.intern(codecs.chain_for(kind, src.shuffle_size, opts.level))
        refs.append(ChunkRef(file_index, offset, length, src.start, src.count, codec, crc))
    size = stats.get("file_size") or os.path.getsize(path)
    return refs, size, stats
