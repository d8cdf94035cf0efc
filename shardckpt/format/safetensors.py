"""Open a Hugging Face weights folder as untrusted input: safetensors headers and the index.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range in the data area, and the data. Everything here is checked before
any of it is trusted: the header length against the file and a cap (so a hostile length never
becomes an allocation), the JSON's size and nesting, every dtype, that each range lies in the
data area and holds exactly shape x itemsize bytes, and that the ranges neither overlap nor
leave holes (the safetensors format's own rules). An index (``model.safetensors.index.json``)
may only name plain file names inside its folder; a name may be a symbolic link to a regular file
(the Hugging Face cache links its snapshots to blobs), never a FIFO or device. Faults are typed errors naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass

import torch

from ..errors import (CheckpointNotFoundError, CorruptCheckpointError, StorageError,
                      UnsafeCheckpointError)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# The safetensors library refuses headers over 100 MB; a real header is a few hundred KiB.
MAX_HEADER_BYTES = 100_000_000
MAX_INDEX_BYTES = 100_000_000

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes lie (absolute file offsets)."""

    file: str
    name: str
    dtype: torch.dtype
    shape: tuple
    start: int  # absolute offset of the first byte in the file
    nbytes: int


def is_hf_folder(path) -> bool:
    """Whether ``path`` is a local folder of HF weights (and no shardckpt checkpoint)."""
    try:
        path = os.fspath(path)
    except TypeError:
        return False
    if not isinstance(path, str) or "://" in path or not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, "manifest.json")):
        return False
    return any(os.path.lexists(os.path.join(path, n)) for n in (SINGLE, INDEX))


def _fail(file: str, why: str, tensor: str | None = None):
    return UnsafeCheckpointError(f"{file}: {why}" + (f" (tensor {tensor!r})" if tensor else ""))


def open_regular(path: str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (a link to one is fine:
    the Hugging Face cache links snapshot files to blobs); a FIFO or device is refused without
    blocking on it.

    Raises:
        CheckpointNotFoundError: no such file. UnsafeCheckpointError: not a regular file.
        StorageError: it cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such safetensors file") from None
    except OSError as exc:
        raise StorageError(exc.errno, f"{path}: cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _fail(path, "not a regular file")
    return fd


def read_header(path: str) -> tuple[dict[str, Entry], int]:
    """The tensors of the safetensors file at ``path``, checked (see the module docstring), and
    the bytes read to learn them (the length field and the header).

    Raises:
        CheckpointNotFoundError: no such file.
        UnsafeCheckpointError: a header length, range, shape or dtype a safe reader refuses;
            names the file and tensor. CorruptCheckpointError: the header is no JSON object.
        StorageError: reading failed.
    """
    fh = os.fdopen(open_regular(path), "rb")
    with fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise _fail(path, f"{size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise _fail(path, f"header length {length} exceeds the file ({size} bytes)")
        if length > MAX_HEADER_BYTES:
            raise _fail(path, f"header length {length} exceeds {MAX_HEADER_BYTES} bytes")
        text = fh.read(length)
    if len(text) != length:
        raise _fail(path, "file shrank while reading its header")
    return _entries(path, _parse(path, text), 8 + length, size), 8 + length


def _parse(path: str, text: bytes) -> dict:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # deep nesting ends as RecursionError
        raise CorruptCheckpointError(f"{path}: safetensors header is not JSON: "
                                     f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{path}: safetensors header is not a JSON object")
    return doc


def _entries(path: str, doc: dict, data_start: int, size: int) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for name, info in doc.items():
        if name == "__metadata__":
            continue
        out[name] = _entry(path, name, info, data_start, size)
    _check_tiling(path, sorted(out.values(), key=lambda e: (e.start, e.nbytes)), data_start,
                  size)
    return out


def _entry(path: str, name: str, info, data_start: int, size: int) -> Entry:
    if not isinstance(info, dict):
        raise _fail(path, "entry is not an object", name)
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code not in DTYPES:
        raise _fail(path, f"unknown dtype {str(code)[:40]!r}", name)
    if not (isinstance(shape, list) and len(shape) <= 64 and all(
            type(d) is int and d >= 0 for d in shape)):
        raise _fail(path, f"shape {str(shape)[:80]} is not a list of sizes", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise _fail(path, f"data_offsets {str(offsets)[:80]} are not [begin, end]", name)
    dtype = DTYPES[code]
    nbytes = offsets[1] - offsets[0]
    # Python ints do not overflow, so a huge shape is simply not equal to the range's length.
    if math.prod(shape) * torch.empty((), dtype=dtype).element_size() != nbytes:
        raise _fail(path, f"shape {shape} of {code} needs another byte count than its range "
                          f"({nbytes} bytes)", name)
    if data_start + offsets[1] > size:
        raise _fail(path, f"range {offsets} ends past the file ({size - data_start} data "
                          "bytes)", name)
    return Entry(path, name, dtype, tuple(shape), data_start + offsets[0], nbytes)


def _check_tiling(path: str, entries: list[Entry], data_start: int, size: int) -> None:
    """Ranges back to back from the data area's start to the file's end: no overlap, no hole."""
    at = data_start
    for e in entries:
        if e.nbytes == 0 and e.start == at:
            continue
        if e.start < at:
            raise _fail(path, "its range overlaps another tensor's", e.name)
        if e.start > at:
            raise _fail(path, f"a hole of {e.start - at} bytes before it", e.name)
        at = e.start + e.nbytes
    if at != size:
        raise _fail(path, f"{size - at} bytes after the last tensor belong to none")


def read_index(folder: str) -> dict[str, str]:
    """``{tensor name: file path}`` of an HF weights folder (its index, or its single file).

    Raises:
        CorruptCheckpointError: the index is no JSON object with a ``weight_map`` of names.
        UnsafeCheckpointError: the index is over MAX_INDEX_BYTES or names a file outside the
            folder (a path or ``..``); names the file. (A name may be a link to a regular file,
            as in the Hugging Face cache; ``open_regular`` refuses anything else.)
        CheckpointNotFoundError: a file it names does not exist.
    """
    index = os.path.join(folder, INDEX)
    if not os.path.isfile(index):
        return {}  # the single-file layout: the caller reads SINGLE's header
    with open(index, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_INDEX_BYTES:
            raise _fail(index, f"over {MAX_INDEX_BYTES} bytes")
        doc = _parse(index, fh.read(size))  # never a buffer of the cap: the file's size
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index}: no weight_map object")
    return {str(name): _shard_path(folder, index, name, f) for name, f in weight_map.items()}


def _shard_path(folder: str, index: str, name, fname) -> str:
    if not (isinstance(fname, str) and fname and os.path.basename(fname) == fname
            and fname not in (".", "..") and "\\" not in fname and "\0" not in fname):
        raise _fail(index, f"names {str(fname)[:80]!r}, not a file inside the folder", str(name))
    return os.path.join(folder, fname)
