"""The shared vocabulary: frozen records every stage of the pipeline passes along.

Save: plan (``TensorItem`` -> ``ChunkSource``) -> encode/write (``ChunkRef``) -> commit
(``Manifest``). Load: ``Manifest`` -> read plan (``ChunkRead``) -> decode -> place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    chunks: tuple[ChunkRef, ...]


@dataclass(frozen=True)
class TensorEntry:
    dtype: DType
    shape: tuple[int, ...]
    shards: tuple[ShardEntry, ...]


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
    rank_trees: tuple | None = None  # one tree per saving rank, where ranks' states differ


@dataclass(frozen=True)
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
