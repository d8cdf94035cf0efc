"""Plan a save: which bytes of which tensors become which chunks.

The plan is pure bookkeeping: it makes each tensor a contiguous CPU buffer (a copy only where the
tensor is not already one) and cuts it into element-aligned chunks of about ``chunk_bytes``.
"""

from __future__ import annotations

import torch

from .types import DTYPE_BY_TORCH, ChunkSource, TensorItem


def host_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a dense row-major CPU tensor; ``t`` itself when it already is one."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous()


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
