"""Plan a save: who writes which piece of which tensor, and which bytes become which chunks.

Locally, each tensor becomes a contiguous CPU buffer (a copy only where it is not already one)
cut into element-aligned chunks of about ``chunk_bytes``. Globally, the coordinator merges the
ranks' local plans and assigns each distinct piece to exactly one rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import codecs, knobs
from .errors import UnsupportedValueError
from .types import DTYPE_BY_TORCH, DTYPES, ChunkSource, TensorItem


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


def local_plan(tree: dict, items: list[TensorItem], world: int) -> dict:
    """This rank's plan as JSON: its tree and, per tensor, what piece of what it holds
    (replica checksums only where there are other ranks to compare with)."""
    limit = knobs.get("replica_check_bytes") if world > 1 else -1
    rows = [[it.key, DTYPE_BY_TORCH[it.tensor.dtype].name, list(it.global_shape),
             list(it.offsets), list(it.tensor.shape), it.dtensor, _replica_crc(it, limit)]
            for it in items]
    return {"tree": tree, "items": rows}


@dataclass
class GlobalPlan:
    """The coordinator's decision: who writes what under which key, and the tensor table."""

    assign: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # rank -> (item, key)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # dtype, shape
    renames: dict[int, dict[str, str]] = field(default_factory=dict)  # per-rank tensor keys


def _pieces(plans: dict[int, dict]):
    """``{key: [(rank, index, dtype, global_shape, offsets, shape, dtensor, crc)]}``."""
    pieces: dict[str, list] = {}
    for rank, plan in sorted(plans.items()):
        for index, (key, dtype, gshape, offsets, shape, dtensor, crc) in enumerate(plan["items"]):
            pieces.setdefault(key, []).append(
                (rank, index, dtype, tuple(gshape), tuple(offsets), tuple(shape), dtensor, crc))
    return pieces


def merge_plans(plans: dict[int, dict]) -> GlobalPlan:
    """Assign every distinct piece to one holder, balancing bytes; keep per-rank copies apart.

    A DTensor piece held by several ranks (a replica) and a plain tensor whose copies agree are
    written once, by the least-loaded holder. Plain tensors whose copies differ (per-rank RNG,
    counters) are written by every holder under ``<key>@rank<r>``. Cost is linear in ranks x
    tensors.
    """
    gp = GlobalPlan(assign={r: [] for r in plans}, renames={r: {} for r in plans})
    boxes: dict[tuple, list] = {}
    for key, held in _pieces(plans).items():
        kinds = {(p[2], p[3], p[6]) for p in held}
        if len(kinds) == 1 and held[0][6]:  # DTensor pieces: one global tensor
            gp.tensors[key] = (held[0][2], held[0][3])
            for p in held:
                boxes.setdefault((key, p[4], p[5]), []).append(p)
        elif len(kinds) == 1 and len({p[7] for p in held}) == 1:  # agreeing plain copies
            gp.tensors[key] = (held[0][2], held[0][3])
            boxes[(key, held[0][4], held[0][5])] = held
        elif any(p[6] for p in held):
            raise UnsupportedValueError(f"{key}: ranks disagree on this DTensor's dtype, shape "
                                        f"or kind: {sorted(kinds)}")
        else:  # per-rank values: each holder writes its own under its own key
            for rank, index, dtype, gshape, *_ in held:
                own = f"{key}@rank{rank}"
                gp.tensors[own] = (dtype, gshape)
                gp.renames[rank][key] = own
                gp.assign[rank].append((index, own))
    load = {r: 0 for r in plans}
    sized = sorted(boxes.items(), key=lambda kv: -math.prod(kv[0][2]) * _itemsize(kv[1][0][2]))
    for (key, _, shape), held in sized:
        rank, index = min(((p[0], p[1]) for p in held), key=lambda ri: (load[ri[0]], ri[0]))
        load[rank] += math.prod(shape) * _itemsize(held[0][2])
        gp.assign[rank].append((index, key))
    return gp


def _itemsize(dtype_name: str) -> int:
    return DTYPES[dtype_name].itemsize
