"""The pure-Python reference codec: the same format and call signatures as the native core.

Written with numpy, ``zstandard`` and ``crc32c`` only, straight from FORMAT.md. Tests use it to
prove the native bytes follow the spec; the reader falls back to it when the native module is
missing. It favours clarity over speed: single-threaded, and ``auto`` behaves as ``zstd``.
"""

from __future__ import annotations

import ctypes
import errno
import os

import crc32c as _crc32c
import numpy as np
import xxhash as _xxhash
import zstandard

from .ids import RAW, SHUFFLE, SHUFFLE_ZSTD, ZSTD

__version__ = "reference"

OK, INVALID, IO_ERROR, NO_SPACE, CHECKSUM, DECODE, TRUNCATED = range(7)


def features() -> dict:
    return {"version": __version__, "zstd": zstandard.ZSTD_VERSION, "crc32c": "crc32c-package",
            "threads": 1, "sync_file_range": False, "policies": ["raw", "zstd", "auto"]}


def crc32c(data, value: int = 0) -> int:
    return _crc32c.crc32c(bytes(data), value)


def shuffle(data, elemsize: int) -> bytes:
    """Byte planes: output byte j*(n/k)+i is input byte i*k+j."""
    return np.frombuffer(bytes(data), np.uint8).reshape(-1, elemsize).T.tobytes()


def unshuffle(data, elemsize: int) -> bytes:
    return np.frombuffer(bytes(data), np.uint8).reshape(elemsize, -1).T.tobytes()


def encode(raw: bytes, shuffle_size: int, policy: str, level: int) -> tuple[bytes, int]:
    """``(stored, kind)`` of one chunk; raw when compression would not make it smaller."""
    if policy == "raw":
        return raw, RAW
    data, kind = (shuffle(raw, shuffle_size), SHUFFLE_ZSTD) if shuffle_size > 1 else (raw, ZSTD)
    packed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    return (packed, kind) if len(packed) < len(raw) else (raw, RAW)


def decode(stored: bytes, kind: int, raw_length: int, shuffle_size: int) -> bytes:
    """The raw bytes of a chunk; raises ValueError when the stored bytes do not decode."""
    data = stored
    if kind in (ZSTD, SHUFFLE_ZSTD):
        params = zstandard.get_frame_parameters(data)
        if params.content_size != raw_length:
            raise ValueError(f"zstd frame declares {params.content_size} bytes, "
                             f"expected {raw_length}")
        # Exactly one frame (FORMAT.md 2.1), as the native core demands: no trailing bytes.
        data = zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_length,
                                                        allow_extra_data=False)
    if len(data) != raw_length:
        raise ValueError(f"decoded {len(data)} bytes, expected {raw_length}")
    if kind in (SHUFFLE, SHUFFLE_ZSTD):
        data = unshuffle(data, shuffle_size)
    return data


def _status(code=OK, message="", chunk=-1, err=0):
    return (code, message, chunk, err)


def content_hash(raw: bytes) -> bytes:
    """A chunk's 16-byte content hash: xxh3-128 of its raw bytes, low word first, each
    little-endian (csrc/core/content_hash.cpp)."""
    return _xxhash.xxh3_128_intdigest(raw).to_bytes(16, "little")


def _hashed(raw: bytes, hash: bool, known: set) -> tuple[bytes | None, bool]:
    """``(hash or None, reused)`` of one chunk's raw bytes."""
    if not hash:
        return None, False
    h = content_hash(raw)
    return h, h in known


def _known(known: bytes) -> set:
    if len(known) % 16:
        raise ValueError("known hashes must be 16-byte records")
    return {bytes(known[i:i + 16]) for i in range(0, len(known), 16)}


def write_file(path, chunks, policy, level, encode_threads, write_threads, pool_bytes, durable,
               header, hash=False, known=b""):
    """Same contract as ``_native.write_file``: chunks are ``(ptr, nbytes, shuffle_size)``."""
    known = _known(known)
    if policy not in ("raw", "zstd", "auto"):
        raise ValueError(f"unknown policy {policy!r}")
    records, raw_total, offset = [], 0, len(header)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        return _status(IO_ERROR, f"{path}: {exc.strerror}", -1, exc.errno), [], {}
    index = -1
    try:
        os.pwrite(fd, header, 0)
        for index, (ptr, nbytes, shuffle_size) in enumerate(chunks):
            raw = ctypes.string_at(ptr, nbytes)
            raw_total += nbytes
            h, reused = _hashed(raw, hash, known)
            if reused:
                records.append((0, 0, RAW, 0, h))
                continue
            stored, kind = encode(raw, shuffle_size, "zstd" if policy == "auto" else policy,
                                  level)
            os.pwrite(fd, stored, offset)
            records.append((offset, len(stored), kind, crc32c(stored)) + ((h,) if hash else ()))
            offset += len(stored)
        if durable:
            os.fsync(fd)
    except OSError as exc:
        code = NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else IO_ERROR
        return _status(code, f"{path}: {exc.strerror}", index, exc.errno), [], {}
    finally:
        os.close(fd)
    stats = {"raw_bytes": raw_total, "stored_bytes": offset - len(header), "file_size": offset,
             "chunks_raw": sum(r[2] == RAW and r[1] > 0 for r in records),
             "chunks_compressed": sum(r[2] != RAW for r in records),
             "chunks_reused": sum(r[1] == 0 for r in records)}
    return _status(), records, stats


def read_chunks(path, reads, threads):
    """Same contract as ``_native.read_chunks``: reads are
    ``(offset, length, raw_length, kind, shuffle_size, crc, dest_ptr[, dest_bytes])``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return _status(IO_ERROR, f"{path}: {exc.strerror}", -1, exc.errno)
    try:
        refused = _refuse_misfit(reads)
        if refused:
            return refused
        for index, (offset, length, raw_length, kind, shuffle_size, crc, dest, *_) in \
                enumerate(reads):
            stored = os.pread(fd, length, offset)
            if len(stored) != length:
                return _status(TRUNCATED, f"{path}: read {len(stored)} of {length} bytes at "
                                          f"offset {offset}", index)
            failed = _check_and_place(stored, index, raw_length, kind, shuffle_size, crc, dest)
            if failed:
                return failed
    except OSError as exc:
        return _status(IO_ERROR, f"{path}: {exc.strerror}", -1, exc.errno)
    finally:
        os.close(fd)
    return _status()


def encode_chunks(chunks, policy, level, encode_threads, pool_bytes, header, hash=False,
                  known=b""):
    """Same contract as ``_native.encode_chunks``: ``(status, bytearray, records, stats)``."""
    if policy not in ("raw", "zstd", "auto"):
        raise ValueError(f"unknown policy {policy!r}")
    out, records, known = bytearray(header), [], _known(known)
    for ptr, nbytes, shuffle_size in chunks:
        raw = ctypes.string_at(ptr, nbytes)
        h, reused = _hashed(raw, hash, known)
        if reused:
            records.append((0, 0, RAW, 0, h))
            continue
        stored, kind = encode(raw, shuffle_size, "zstd" if policy == "auto" else policy, level)
        records.append((len(out), len(stored), kind, crc32c(stored)) + ((h,) if hash else ()))
        out += stored
    stats = {"raw_bytes": sum(c[1] for c in chunks), "file_size": len(out),
             "stored_bytes": len(out) - len(header),
             "chunks_raw": sum(r[2] == RAW and r[1] > 0 for r in records),
             "chunks_compressed": sum(r[2] != RAW for r in records),
             "chunks_reused": sum(r[1] == 0 for r in records)}
    return _status(), out, records, stats


def decode_chunks(data, name, reads, threads):
    """Same contract as ``_native.decode_chunks``: ``read_chunks`` over bytes in memory."""
    data = memoryview(data)
    refused = _refuse_misfit(reads)
    if refused:
        return refused
    for index, (offset, length, raw_length, kind, shuffle_size, crc, dest, *_) in \
            enumerate(reads):
        if offset + length > len(data):
            return _status(TRUNCATED, f"{name}: range ends past the {len(data)} bytes", index)
        stored = bytes(data[offset:offset + length])
        failed = _check_and_place(stored, index, raw_length, kind, shuffle_size, crc, dest)
        if failed:
            return failed
    return _status()


def _refuse_misfit(reads):
    """The failure status of the first read whose destination (``dest_bytes``, when given)
    does not hold exactly what the chunk decodes to, before anything is written; else None."""
    for index, r in enumerate(reads):
        if len(r) > 7 and r[6] and r[7] != r[2]:
            return _status(INVALID, f"destination holds {r[7]} bytes but the chunk decodes to "
                                    f"{r[2]}; refusing to write past it", index)
    return None


def _check_and_place(stored: bytes, index, raw_length, kind, shuffle_size, crc, dest):
    """Verify one chunk's checksum, decode it and copy it to ``dest`` (0: verify only).
    None when it is sound, else the failure status naming chunk ``index``."""
    actual = crc32c(stored)
    if actual != crc:
        return _status(CHECKSUM, f"crc32c mismatch: stored {crc:#010x}, "
                                 f"computed {actual:#010x}", index)
    try:
        raw = decode(stored, kind, raw_length, shuffle_size)
    except (ValueError, zstandard.ZstdError) as exc:
        return _status(DECODE, str(exc), index)
    if dest:
        ctypes.memmove(dest, raw, raw_length)
    return None
