"""Encode and upload data files to stores without local paths (object stores), under pressure
from the upload slots.

Save: a data file's chunks are encoded by the native core into memory, one part (about
``upload_part_bytes`` raw) at a time, and the parts are uploaded concurrently as a multipart
upload where the store has one (S3), else as one object. The bytes are exactly those the local
writer puts in a file (FORMAT.md 2). Nothing here calls fsync or rename. Memory stays near
``remote_concurrency`` parts per file. With ``codec="auto"`` each part is compressed when the
uploads, not the encoder, are the bottleneck (``Pressure``). Load: each file's planned chunk reads are merged into
ranges of adjacent chunks, fetched concurrently, and decoded into place by the native core.
"""

from __future__ import annotations

import threading
from functools import partial
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from .. import codecs, knobs
from ..codecs.status import raise_for
from ..storage import Storage
from ..types import FILE_HEADER, ChunkSource


class Pressure:
    """Whether the uploads of one file are the bottleneck, for ``codec="auto"``.

    The native ``auto`` policy watches its own writer's queue; on an object store the encoder
    writes into memory and the uploads happen here, so the signal comes from the upload slots:
    when a finished part found every slot still busy, the network is slower than encoding raw,
    and compressing the next part costs no time (it overlaps uploads that are waiting anyway)
    while it sends fewer bytes. When a slot was free, encoding is the bottleneck: stay raw.
    """

    def __init__(self):
        self.uploads_behind = False

    def codec(self, requested: str) -> str:
        """The policy to encode the next part with."""
        if requested != "auto":
            return requested
        return "zstd" if self.uploads_behind else "raw"


def upload(storage: Storage, path: str, parts: Iterable, concurrency: int | None = None,
           pressure: Pressure | None = None) -> int:
    """Store the concatenation of ``parts`` (bytes-like, produced lazily) as object ``path``;
    returns its size; reports to ``pressure`` whether uploads fall behind. Raises
    StorageError; an unfinished multipart upload is aborted."""
    minimum = storage.multipart_min_bytes
    if not minimum:
        data = b"".join(parts)
        storage.write(path, data, exclusive=False)
        return len(data)
    merged = _at_least(parts, minimum)
    first = next(merged, b"")
    second = next(merged, None)
    if second is None:  # small enough for one request
        storage.write(path, first, exclusive=False)
        return len(first)
    return _multipart(storage, path, [first, second], merged,
                      concurrency or knobs.get("remote_concurrency"), pressure or Pressure())


def _at_least(parts: Iterable, minimum: int) -> Iterator:
    """Consecutive parts joined until each (but the last) has ``minimum`` bytes."""
    pending, size, sent = [], 0, False
    for part in parts:
        pending.append(part)
        size += len(part)
        if size >= minimum:
            yield pending[0] if len(pending) == 1 else b"".join(pending)
            pending, size, sent = [], 0, True
    if pending or not sent:
        yield b"".join(pending)


def _multipart(storage: Storage, path: str, head: list, rest: Iterator, concurrency: int,
               pressure: Pressure) -> int:
    upload_id = storage.begin_upload(path)
    slots = threading.Semaphore(concurrency)  # bounds the parts held in memory
    futures, size = [], 0
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            for number, part in enumerate(_chain(head, rest), 1):
                pressure.uploads_behind = not slots.acquire(blocking=False)
                if pressure.uploads_behind:
                    slots.acquire()
                fut = pool.submit(storage.upload_part, path, upload_id, number, part)
                fut.add_done_callback(lambda _: slots.release())
                futures.append(fut)
                size += len(part)
                if any(f.done() and f.exception() for f in futures):
                    break  # a part failed for good: stop encoding more
            tags = [f.result() for f in futures]
        storage.complete_upload(path, upload_id, tags)
    except BaseException:
        try:
            storage.abort_upload(path, upload_id)
        except Exception:  # the original failure matters more; a lifecycle rule cleans up
            pass
        raise
    return size


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


def encoded_parts(rel: str, sources: list[ChunkSource], opts, pool_bytes: int, threads: int,
                  records: list, stats: dict, part_bytes: int | None = None,
                  pressure: Pressure | None = None, known: bytes = b"") -> Iterator:
    """Encode ``sources`` into the parts of one data file (header first), lazily; fills
    ``records`` with each chunk's ``(offset, length, kind, crc)`` in the file. ``auto`` asks
    ``pressure`` per part. Raises the typed error of a failed encode."""
    pressure = pressure or Pressure()
    part_bytes = part_bytes or knobs.get("upload_part_bytes")
    groups, group, raw = [], [], 0
    for i, src in enumerate(sources):
        group.append(i)
        raw += src.nbytes
        if raw >= part_bytes:
            groups.append(group)
            group, raw = [], 0
    groups += [group] if group or not groups else []
    offset = 0
    for n, group in enumerate(groups):
        chunks = [(sources[i].ptr, sources[i].nbytes, sources[i].shuffle_size) for i in group]
        status, data, recs, st = codecs.backend.encode_chunks(
            chunks, pressure.codec(opts.codec), opts.level, threads, pool_bytes,
            FILE_HEADER if n == 0 else b"", opts.content_hashes, known)
        raise_for(status, file=rel, describe=lambda i, g=group: (sources[g[i]].key, None))
        records += [(offset + r[0],) + tuple(r[1:]) for r in recs]
        offset += len(data)
        for key, value in st.items():
            stats[key] = max(stats.get(key, 0), value) if key == "wall_seconds" else \
                stats.get(key, 0) + value
        yield data


def write_one(storage: Storage, path: str, rel: str, sources: list[ChunkSource], opts,
              pool_bytes: int, encode_threads: int, known: bytes = b"") -> tuple[list, int, dict]:
    """``write._write_one`` for object stores: encode ``sources`` and upload them as ``path``."""
    records, stats, pressure = [], {}, Pressure()
    size = upload(storage, path, encoded_parts(rel, sources, opts, pool_bytes, encode_threads,
                                               records, stats, pressure=pressure, known=known),
                  pressure=pressure)
    stats["file_size"] = size
    return records, size, stats


def write_targets(storage: Storage, tmp: str, rels: list[str]) -> tuple[list, object]:
    """``(files, write_one)`` for write_data_files: real paths and the native file writer on
    local disks, storage paths and the uploader on object stores."""
    if storage.local_path(tmp) is not None:
        return [(storage.local_path(f"{tmp}/{r}"), r) for r in rels], None
    return [(f"{tmp}/{r}", r) for r in rels], partial(write_one, storage)
