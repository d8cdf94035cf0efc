"""Streaming safetensors writer: headers computed from the manifest, data read shard by shard.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range) and the tensors' bytes back to back. Every fact the header needs is
in the checkpoint's manifest, so the header is written first and the data follows, one output
file's tensors at a time: memory is bounded by one output file (or by the largest tensor, when a
tensor alone exceeds the limit), never by the model. Used by ``shardckpt.ops.export``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from ..errors import ExportError
from ..load import ReadPlan
from ..types import Manifest

# torch dtype -> safetensors dtype code (the safetensors format's names).
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                     ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        ST_DTYPES[getattr(torch, _name)] = _code


@dataclass(frozen=True)
class Item:
    """One output tensor: its name, the manifest key it comes from, and its output dtype."""

    name: str
    key: str
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes in the output file."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def make_items(m: Manifest, names: dict[str, str], cast: torch.dtype | None) -> list[Item]:
    """The output tensors of ``{name: manifest key}``; ``cast`` converts floating tensors only.

    Raises:
        ExportError: a dtype safetensors cannot hold (complex, fnuz float8), or the name
            ``__metadata__`` (the header's own member), naming the tensor.
    """
    items = []
    for name, key in names.items():
        if name == "__metadata__":  # the header's own member: the file would not load
            raise ExportError(f"tensor {key!r} would be named '__metadata__', which "
                              "safetensors reserves; rename it or pass a prefix")
        entry = m.tensors[key]
        dtype = entry.dtype.torch
        if cast is not None and dtype.is_floating_point:
            dtype = cast
        if dtype not in ST_DTYPES:
            raise ExportError(f"tensor {name!r} has dtype {entry.dtype.name}, which safetensors "
                              f"cannot hold (supported: "
                              f"{', '.join(sorted(str(d)[6:] for d in ST_DTYPES))})")
        items.append(Item(name, key, tuple(entry.shape), dtype))
    return items


def split(items: list[Item], max_bytes: int | None) -> list[list[Item]]:
    """Consecutive groups of at most ``max_bytes`` each (a larger tensor gets a group alone)."""
    groups: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if max_bytes is not None and groups[-1] and size + item.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return groups if groups[0] else []


def header(items: list[Item], metadata: dict | None = None) -> bytes:
    """The length-prefixed JSON header of a file holding ``items`` in order, padded to 8."""
    doc: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    at = 0
    for item in items:
        doc[item.name] = {"dtype": ST_DTYPES[item.dtype], "shape": list(item.shape),
                          "data_offsets": [at, at + item.nbytes]}
        at += item.nbytes
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_file(dest: str, m: Manifest, paths: list, items: list[Item],
               threads: int | None = None) -> int:
    """Write one safetensors file holding ``items``, read from the checkpoint; its data bytes.

    The group's tensors are read with one plan (concurrent chunk reads), then written in order
    and fsynced; each tensor is released once written.
    """
    plan, buffers = ReadPlan(m), {}
    for item in items:
        if item.key not in buffers:  # a tied weight is read once, written under each name
            entry = m.tensors[item.key]
            buffers[item.key] = t = torch.empty(entry.shape, dtype=entry.dtype.torch)
            plan.into(item.key, t)
    plan.run(paths, threads)
    uses = {}
    for item in items:
        uses[item.key] = uses.get(item.key, 0) + 1
    total = 0
    with open(dest, "wb") as fh:
        fh.write(header(items))
        for item in items:
            t = buffers[item.key].to(item.dtype)
            fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            total += item.nbytes
            uses[item.key] -= 1
            if not uses[item.key]:
                del buffers[item.key]  # memory goes as the file fills
            del t
        fh.flush()
        os.fsync(fh.fileno())
    return total
