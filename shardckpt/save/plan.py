"""Plan a save: who writes which piece of which tensor, and which bytes become which chunks.

Each tensor becomes a contiguous CPU buffer (a copy only where it is not already one) cut into
element-aligned chunks of about ``chunk_bytes``; ``local_plan`` describes what this rank holds
for the coordinator, which merges all ranks' plans (merge.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import codecs, knobs
from ..format import tables
from ..types import DTYPE_BY_TORCH, ChunkSource, TensorItem


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a dense row-major tensor on its device; ``t`` itself when it already
    is one (conjugate and negative views resolved)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous()


def host_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a dense row-major CPU tensor; ``t`` itself when it already is one."""
    return dense(t if t.device.type == "cpu" else t.detach().cpu())


def chunk_ranges(numel: int, itemsize: int, chunk_bytes: int):
    """``(start, count)`` element ranges of about ``chunk_bytes`` each covering ``numel``."""
    per_chunk = max(1, chunk_bytes // itemsize)
    for start in range(0, numel, per_chunk):
        yield start, min(per_chunk, numel - start)


def plan_chunks(items: list[TensorItem], chunk_bytes: int
                ) -> tuple[list[ChunkSource], list[torch.Tensor]]:
    """Chunk sources for every tensor, plus the host tensors that must outlive the write."""
    sources, keep = [], []
    for item in items:
        host = host_contiguous(item.tensor)
        keep.append(host)
        dtype = DTYPE_BY_TORCH[host.dtype]
        base = host.data_ptr()
        for start, count in chunk_ranges(host.numel(), dtype.itemsize, chunk_bytes):
            sources.append(ChunkSource(item.key, base + start * dtype.itemsize,
                                       count * dtype.itemsize, dtype.shuffle_size, start, count))
    return sources, keep


# --- distributed planning: every rank describes what it holds; the coordinator assigns writes ---

def tensor_bytes(host: torch.Tensor):
    """The bytes of a dense CPU tensor as a flat uint8 numpy array (no copy)."""
    return host.reshape(-1).view(torch.uint8).numpy()


def _replica_crc(item: TensorItem, limit: int):
    """Checksum of a plain tensor's copy, so the coordinator can tell replicas from per-rank
    values; None where checking would cost a device copy of a large tensor."""
    t = item.tensor
    nbytes = t.numel() * t.element_size()
    if item.dtensor or nbytes > limit or (t.device.type != "cpu" and nbytes > 1 << 20):
        return None
    return codecs.backend.crc32c(tensor_bytes(host_contiguous(t)))


def local_plan(skeleton: dict, values: list, items: list[TensorItem], world: int,
               rules: bool = False) -> dict:
    """This rank's plan as JSON text fields and int64 tables, cheap for the coordinator to
    compare across thousands of ranks (merge.py): the tensor layout (key, dtype, global shape,
    is-DTensor), the tree's skeleton and its values (``tree.flatten_split``), each piece's box
    and replica checksum. The layout and skeleton texts are reused while they repeat.

    With ``rules`` (a save that writes chunk index files, FORMAT.md 3.7), DTensors on a plain
    grid are described by their rule (``grid`` field: ``[[item, rule id], ...]`` and the
    distinct rule texts), the same text on every rank of the mesh; only the other pieces get a
    box row."""
    limit = knobs.get("replica_check_bytes") if world > 1 else -1
    layout = [[it.key, DTYPE_BY_TORCH[it.tensor.dtype].name, list(it.global_shape), it.dtensor]
              for it in items]
    ruled = [i for i, it in enumerate(items) if rules and it.rule is not None]
    explicit = sorted(set(range(len(items))) - set(ruled)) if ruled else range(len(items))
    width = max((len(it.global_shape) for it in items), default=0)
    rows = []
    for i in explicit:  # [offsets..., 0 padding, local shape..., 0 padding]
        it = items[i]
        pad = (0,) * (width - len(it.global_shape))
        rows.append((*it.offsets, *pad, *it.tensor.shape, *pad))
    boxes = np.array(rows, dtype=np.int64).reshape(len(rows), 2 * width)
    crcs = [_replica_crc(it, limit) for it in items] if limit >= 0 else [None] * len(items)
    plan = {"layout": tables.pack_text_again("layout", layout),
            "skeleton": tables.pack_text_again("skeleton", skeleton),
            "values": tables.pack_text(values), "width": width, "boxes": tables.encode(boxes),
            "crc": tables.encode(np.array([-1 if c is None else c for c in crcs], np.int64))}
    if rules:
        texts = list(dict.fromkeys(items[i].rule for i in ruled))
        plan["grid"] = tables.pack_text({"rules": texts, "items": [
            [i, texts.index(items[i].rule)] for i in ruled]})
    return plan
