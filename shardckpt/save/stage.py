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

With guards (guard.py) the pieces come eager first: the caller copies those and returns, and a
long-lived background thread copies the guarded rest into the same slots, checking each piece's
version counter as it lands (after one CUDA event per batch for device tensors).
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .. import knobs
from ..dist.topology import local_world_size
from .plan import chunk_ranges, dense
from ..types import DTYPE_BY_TORCH, ChunkSource, TensorItem

ALIGN = 64  # every staged chunk starts at a multiple of this (any dtype view is aligned)
MIN_BUDGET = 1 << 20


def default_budget() -> int:
    """0.6 x the host's available memory, shared by the node's local ranks."""
    available = 0
    try:
        with open("/proc/meminfo", "rb") as f:
            text = f.read()
        at = text.find(b"MemAvailable:")
        if at >= 0:
            available = int(text[at:].split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if not available:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(0.6 * available / local_world_size())


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


class Worker:
    """One long-lived background thread: starting a thread per save costs the caller ~1-2 ms
    on a loaded host (``Thread.start`` waits until the thread runs), a pool's ``submit`` does
    not wait. Saves run one at a time, so one thread suffices; a forked child starts afresh.

    ``os_name`` (at most 15 characters) names the thread for ``top -H`` and ``/proc``. With
    ``background=True`` the thread also lowers its own priority by the ``background_nice`` knob,
    once, at its start: on Linux a thread's nice value is its own and the threads it starts (the
    native encoders and writers) inherit it, so the training threads win a contended core."""

    def __init__(self, name: str, os_name: str = "", background: bool = False):
        self.name, self.background, self.pool = name, background, None
        self.os_name = (os_name or name)[:15]
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self.pool = None  # the parent's thread does not exist in the child

    def _start(self) -> None:
        name_thread(self.os_name)
        if self.background:
            lower_priority(int(knobs.get("background_nice")))

    def submit(self, fn, *args) -> Future:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix=self.name,
                                           initializer=self._start)
        return self.pool.submit(fn, *args)


def name_thread(name: str) -> None:
    """Give the calling thread an OS-visible name (Linux ``prctl(PR_SET_NAME)``); a no-op
    elsewhere."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


def lower_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's nice value (Linux: per thread, by its tid). It cannot
    be undone without privileges, which is why only a dedicated background thread calls it."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, 19))
    except OSError:
        pass  # a container may forbid it; the save still works at normal priority


# Not lowered: the guarded copy must finish before the next optimizer.step().
COPIER = Worker("shardckpt-stage", "sc-copy")


class _Slot:
    def __init__(self, memory: torch.Tensor):
        self.memory, self.free = memory, threading.Event()
        self.free.set()


class _Failed:
    """Put on the queue instead of a batch: the staging raised this."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _batches(pieces: list[TensorItem], slot_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Lists of ``(piece index, start, count)`` runs, each list <= ``slot_bytes``: a piece is
    one run when it fits, else it is cut where the slot is full. Empty pieces have nothing to
    stage. Only sizes are looked at: the tensors are read when copied."""
    out, batch, used = [], [], 0
    for i, piece in enumerate(pieces):
        numel, itemsize, start = piece.tensor.numel(), piece.tensor.element_size(), 0
        while start < numel:
            room = (slot_bytes - used) // itemsize
            if room < 1:  # this slot is full: the rest goes to the next one
                out.append(batch)
                batch, used = [], 0
                continue
            count = min(numel - start, room)
            batch.append((i, start, count))
            used += _aligned(count * itemsize)
            start += count
    if batch:
        out.append(batch)
    return out


class Stager:
    """Copies pieces into the arena and feeds ``(sources, done)`` batches to a writer.

    ``run`` (the caller's thread) copies the eager pieces, the first ``eager`` of ``pieces``,
    and returns; the lazy rest (a guard's tensors, see guard.py) is then copied by a background
    thread, checked by ``watch`` as each piece lands. ``batches`` (the writer's thread) yields
    what ``saver.write_rank`` consumes.
    """

    def __init__(self, pieces: list[TensorItem], budget: int, chunk_bytes: int,
                 eager: int | None = None, watch=None, arena: StagingArena | None = None):
        total = sum(_aligned(p.tensor.numel() * p.tensor.element_size()) for p in pieces)
        budget = max(budget, MIN_BUDGET)
        self.pieces, self.chunk_bytes, self.aborted = pieces, chunk_bytes, False
        self.eager = len(pieces) if eager is None else eager
        self.watch, self.streaming = watch, total > budget
        self.arena = ARENA if arena is None else arena  # the local tier stages into its own
        self.arena.lock.acquire()
        arena = self.arena.take(min(total, budget) if self.streaming else total)
        half = arena.numel() // 2 // ALIGN * ALIGN
        self.slot_bytes = half if self.streaming else max(total, ALIGN)
        self.slots = ([_Slot(arena[:half]), _Slot(arena[half:2 * half])] if self.streaming
                      else [_Slot(arena)])
        self.plan = _batches(pieces, self.slot_bytes)
        self.queue: queue.Queue = queue.Queue()
        self.staged = threading.Event()
        self.copier: Future | None = None
        self._at = (0, 0)  # (batch, run) to copy next
        self._sources, self._offset, self._flat, self._landed = [], 0, {}, []
        self.device_stream = self._side_stream()

    def _side_stream(self):
        """A side stream that first waits for the work already queued on the training's stream,
        so the copies see the values at the call; made here, in the caller's thread."""
        devices = {p.tensor.device for p in self.pieces if p.tensor.device.type == "cuda"}
        if not devices:
            return None
        device = next(iter(devices))  # one device per rank
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        return stream

    def run(self) -> None:
        """Copy the eager runs (blocks while both slots wait to be written, when streaming),
        then hand the lazy ones to a background thread."""
        try:
            finished = self._copy(stop_at_lazy=True)
            if not finished and not self.aborted:
                self._landing()  # device copies of the eager runs, before the caller goes on
                self.copier = COPIER.submit(self._copy_rest)
                return
        except BaseException as exc:
            self._end(exc)
            raise
        self._end(None)

    def _copy_rest(self) -> None:
        try:
            self._copy(stop_at_lazy=False)
        except BaseException as exc:  # the writer raises it; the save fails
            self._end(exc)
            return
        self._end(None)

    def _end(self, exc) -> None:
        if exc is not None:
            self.queue.put(_Failed(exc))
        self.queue.put(None)
        if self.watch is not None:
            self.watch.release()
        self.staged.set()

    def _copy(self, stop_at_lazy: bool) -> bool:
        """Copy from ``_at`` on; False when it stopped at the first lazy run or was aborted."""
        b, r = self._at
        while b < len(self.plan):
            batch = self.plan[b]
            if r == 0:
                if stop_at_lazy and batch[0][0] >= self.eager:
                    break  # the copier takes this batch's slot
                slot = self.slots[b % len(self.slots)]
                slot.free.wait()
                if self.aborted:  # the writer failed: nothing more to copy
                    return False
                slot.free.clear()
                self._sources, self._offset = [], 0
            memory = self.slots[b % len(self.slots)]
            while r < len(batch):
                i, start, count = batch[r]
                if (stop_at_lazy and i >= self.eager) or self.aborted:
                    self._at = (b, r)
                    return False
                self._copy_run(memory.memory, i, start, count)
                r += 1
            self._landing()
            self.queue.put((self._sources, memory.free.set))
            b, r = b + 1, 0
        self._at = (b, r)
        return b == len(self.plan)

    def _copy_run(self, memory: torch.Tensor, i: int, start: int, count: int) -> None:
        """One copy per run, then the run is cut into chunks of about ``chunk_bytes``."""
        piece = self.pieces[i]
        flat = self._flat.get(i)
        if flat is None:
            flat = self._flat[i] = self._dense(piece.tensor)
        dtype = DTYPE_BY_TORCH[flat.dtype]
        nbytes = count * dtype.itemsize
        dst = memory[self._offset:self._offset + nbytes].view(flat.dtype)
        self._copy_one(dst, flat[start:start + count])
        if i >= self.eager:  # a lazy piece: the edges its page watch misses, from the call
            self.watch.restore_edges(i - self.eager, dst, start, count)
        base = dst.data_ptr()
        for at, n in chunk_ranges(count, dtype.itemsize, self.chunk_bytes):
            self._sources.append(ChunkSource(piece.key, base + at * dtype.itemsize,
                                             n * dtype.itemsize, dtype.shuffle_size, start + at,
                                             n))
        self._offset += _aligned(nbytes)
        if start + count == flat.numel():  # the piece's last run
            del self._flat[i]
            if i >= self.eager:
                self._landed.append(i)
                if flat.device.type != "cuda":
                    self._landing()

    def _dense(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            return dense(t).reshape(-1)
        with torch.cuda.stream(self.device_stream):  # ordered after the call, like the copies
            flat = dense(t).reshape(-1)
        return flat

    def _landing(self) -> None:
        """The batch's device copies have landed (one event per batch): check the lazy pieces
        that are now whole in the arena."""
        if self.device_stream is not None:
            event = torch.cuda.Event()
            event.record(self.device_stream)
            event.synchronize()
        landed, self._landed = self._landed, []
        for i in landed:
            self.watch.copied(i - self.eager)

    def _copy_one(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if src.device.type != "cuda":
            dst.copy_(src)
            return
        with torch.cuda.stream(self.device_stream):
            dst.copy_(src, non_blocking=True)
            src.record_stream(self.device_stream)

    def batches(self):
        """The writer's side: batches as they are staged, until the last; raises what the
        staging raised (StateChangedError), so that nothing is committed."""
        while (item := self.queue.get()) is not None:
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def abort(self) -> None:
        """The writer stopped (failed): wake a blocked copy so that it returns."""
        self.aborted = True
        for slot in self.slots:
            slot.free.set()

    def release(self) -> None:
        """Hand the arena to the next save (once, after the copier stopped writing into it)."""
        if self.copier is not None:
            self.copier.result()
        with _RELEASE:
            if not getattr(self, "released", False):
                self.released = True
                self.arena.lock.release()


_RELEASE = threading.Lock()
