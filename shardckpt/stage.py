"""Stage: copy the state out of the training's way into reusable host memory, under a budget.

``async_save`` returns once this is done; encoding, writing and the commit follow in the
background from the staged copies. The staging memory is one arena per process, allocated once
and reused by later saves (pinned when CUDA is available, so device copies run on a side stream
without blocking the training's stream).

When the pieces fit the budget they are copied whole and the caller's stall is just the copy.
When they do not, the arena is split into two slots and the state streams through them: copy a
batch of chunks into a free slot, hand it to the writer, copy the next batch into the other slot
while the first is written. The caller then waits for the disk (until the last batch is
copied), but host memory grows by the budget, not by the state. A non-contiguous tensor is made
contiguous first, which costs one extra copy of that tensor outside the budget.
"""

from __future__ import annotations

import os
import queue
import threading

import torch

from .plan import chunk_ranges, dense
from .types import DTYPE_BY_TORCH, ChunkSource, TensorItem

ALIGN = 64  # every staged chunk starts at a multiple of this (any dtype view is aligned)
MIN_BUDGET = 1 << 20


def default_budget() -> int:
    """0.6 x the host's available memory, shared by the node's local ranks."""
    available = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not available:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(0.6 * available / max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1))


class StagingArena:
    """Host memory reused across saves; grows (once) to the largest staging a save needed."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.lock = threading.Lock()  # one save stages at a time

    def take(self, nbytes: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None  # free the old one before allocating the new
            self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8,
                                      pin_memory=torch.cuda.is_available())
        return self.buffer[:nbytes]


ARENA = StagingArena()


class _Slot:
    def __init__(self, memory: torch.Tensor):
        self.memory, self.free = memory, threading.Event()
        self.free.set()


def _batches(pieces: list[TensorItem], slot_bytes: int):
    """Lists of ``(piece, flat tensor, start, count)`` runs, each list <= ``slot_bytes``: a
    piece is one run when it fits, else it is cut where the slot is full. Empty pieces have
    nothing to stage."""
    batch, used = [], 0
    for piece in pieces:
        flat = dense(piece.tensor).reshape(-1)  # stays on its device: copied from there
        itemsize, start = flat.element_size(), 0
        while start < flat.numel():
            room = (slot_bytes - used) // itemsize
            if room < 1:  # this slot is full: the rest goes to the next one
                yield batch
                batch, used = [], 0
                continue
            count = min(flat.numel() - start, room)
            batch.append((piece, flat, start, count))
            used += -(-count * itemsize // ALIGN) * ALIGN
            start += count
    if batch:
        yield batch


class Stager:
    """Copies pieces into the arena and feeds ``(sources, done)`` batches to a writer.

    ``run`` (the caller's thread) returns once the last byte is copied; ``batches`` (the writer's
    thread) yields what ``saver.write_rank`` consumes.
    """

    def __init__(self, pieces: list[TensorItem], budget: int, chunk_bytes: int):
        total = sum(-(-p.tensor.numel() * p.tensor.element_size() // ALIGN) * ALIGN
                    for p in pieces)
        budget = max(budget, MIN_BUDGET)
        self.pieces, self.chunk_bytes, self.aborted = pieces, chunk_bytes, False
        self.streaming = total > budget
        ARENA.lock.acquire()
        arena = ARENA.take(min(total, budget) if self.streaming else total)
        half = arena.numel() // 2 // ALIGN * ALIGN
        self.slot_bytes = half if self.streaming else max(total, ALIGN)
        self.slots = ([_Slot(arena[:half]), _Slot(arena[half:2 * half])] if self.streaming
                      else [_Slot(arena)])
        self.queue: queue.Queue = queue.Queue()
        self.device_stream = None

    def run(self) -> None:
        """Copy every chunk; blocks while both slots wait to be written (streaming)."""
        try:
            for n, batch in enumerate(_batches(self.pieces, self.slot_bytes)):
                slot = self.slots[n % len(self.slots)]
                slot.free.wait()
                if self.aborted:  # the writer failed: nothing more to copy
                    return
                slot.free.clear()
                self.queue.put((self._copy(batch, slot.memory), slot.free.set))
        finally:
            self.queue.put(None)

    def _copy(self, batch, memory: torch.Tensor) -> list[ChunkSource]:
        """One copy per run, then the run is cut into chunks of about ``chunk_bytes``."""
        sources, offset = [], 0
        for piece, flat, start, count in batch:
            dtype = DTYPE_BY_TORCH[flat.dtype]
            nbytes = count * dtype.itemsize
            dst = memory[offset:offset + nbytes].view(flat.dtype)
            self._copy_one(dst, flat[start:start + count])
            base = dst.data_ptr()
            for at, n in chunk_ranges(count, dtype.itemsize, self.chunk_bytes):
                sources.append(ChunkSource(piece.key, base + at * dtype.itemsize,
                                           n * dtype.itemsize, dtype.shuffle_size, start + at, n))
            offset += -(-nbytes // ALIGN) * ALIGN
        if self.device_stream is not None:
            self.device_stream.synchronize()  # the batch's device copies have landed
        return sources

    def _copy_one(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if src.device.type != "cuda":
            dst.copy_(src)
            return
        if self.device_stream is None:
            # A side stream that first waits for the work already queued on the training's
            # stream, so the copies see the values at the call.
            self.device_stream = torch.cuda.Stream(device=src.device)
            self.device_stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(self.device_stream):
            dst.copy_(src, non_blocking=True)
            src.record_stream(self.device_stream)

    def batches(self):
        """The writer's side: batches as they are staged, until the last."""
        while (item := self.queue.get()) is not None:
            yield item

    def abort(self) -> None:
        """The writer stopped (failed): wake a blocked ``run`` so that it returns."""
        self.aborted = True
        for slot in self.slots:
            slot.free.set()

    def release(self) -> None:
        """Hand the arena to the next save (once; from whichever thread finishes last)."""
        with _RELEASE:
            if not getattr(self, "released", False):
                self.released = True
                ARENA.lock.release()


_RELEASE = threading.Lock()
