"""Guards: optimizers whose ``step()`` is the only thing that changes the tensors they own, so
that ``async_save`` may copy those tensors after it returns, during the next forward/backward.

A guard owns its parameters and their per-parameter state (``optimizer.state[p]``), matched by
storage, so views, ``state_dict()`` values and the DTensor local shards of ``get_state_dict``
count. Each save that copies some of a guard's tensors lazily registers a step pre-hook on it
that waits for those copies. Nothing is trusted blindly, and two witnesses watch each lazily
copied tensor from the call until its copy:

- its version counter (and that of a DTensor's local tensor), checked after its copy and once
  more when its guard's last copy lands, while the step is still held; an in-place op through
  the tensor, a view or ``detach()`` moves it, ``set_`` too;
- its pages (CPU): a write through an alias with a counter of its own (``p.data``, a numpy
  view, another thread's fresh alias) moves no counter we can see, so the pages the tensor
  fills are made read-only at the call (csrc/core/write_watch.h) and the first write there is
  recorded; the bytes at its two partial edge pages are kept by value at the call and copied
  from there. A CPU tensor this cannot cover (no native core, not dense, under two pages) is
  copied before the call returns instead.

A change seen either way fails the save with StateChangedError; the checkpoint is never torn.
On CUDA only the counters watch (a ``p.data`` write there is not seen).

torch runs step pre-hooks while iterating its hook dict, and removing an entry there raises
("OrderedDict mutated during iteration") as soon as another hook is registered. So a hook that
has waited retires (it becomes a no-op) and is unregistered by the next ``async_save`` call.
"""

from __future__ import annotations

import threading
import time

import torch

from .. import codecs
from ..errors import StateChangedError
from ..format.tree import MAX_DEPTH, dtensor_type

Optimizer = torch.optim.Optimizer


def find_guards(state, guard) -> list[Optimizer]:
    """The guards of a save: ``guard`` (an optimizer, a list of them, or None) and every
    optimizer found as a value inside ``state``, each once."""
    given = [] if guard is None else list(guard) if isinstance(guard, (list, tuple)) else [guard]
    for g in given:
        if not isinstance(g, Optimizer):
            raise TypeError(f"guard must be a torch.optim.Optimizer or a list of them, "
                            f"not {type(g).__name__}")
    found: dict[int, Optimizer] = {id(g): g for g in given}
    _walk(state, found, 0)
    return list(found.values())


def _walk(obj, found: dict, depth: int) -> None:
    if depth > MAX_DEPTH:
        return  # flatten reports the depth
    if isinstance(obj, Optimizer):
        found.setdefault(id(obj), obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk(v, found, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, found, depth + 1)


def storage_key(t: torch.Tensor, dt=None):
    """What identifies the memory of ``t`` (a DTensor's local shard); None when empty.
    ``dt``: ``tree.dtensor_type()``, if the caller has it at hand."""
    dt = dt or dtensor_type()
    if dt is not None and isinstance(t, dt):
        t = t.to_local()
    if t.numel() == 0:
        return None
    return t.device, t.untyped_storage().data_ptr()


def owners(guards: list[Optimizer]) -> dict:
    """``{storage key: (guard indices, witnesses)}`` of every tensor the guards own.

    The witnesses are the tensors whose version counters reveal a change: the optimizer's own
    tensor and, for a DTensor, its local tensor too. A DTensor and its local tensor count
    separately (an op on the DTensor moves only the DTensor's counter, one on a ``to_local()``
    view only the local's), and the DTensors ``get_state_dict`` returns share the counter of
    the optimizer's, not that of its local tensor.
    """
    owned: dict = {}
    dt = dtensor_type()

    def add(t, g):
        key = storage_key(t, dt)
        if key is not None:
            guards, witnesses = owned.setdefault(key, (set(), []))
            guards.add(g)
            witnesses.append(t)
            if dt is not None and isinstance(t, dt):
                witnesses.append(t._local_tensor)
    for g, opt in enumerate(guards):
        for group in opt.param_groups:
            for p in group["params"]:
                add(p, g)
                for v in opt.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor):
                        add(v, g)
    return owned


PAGE = 4096  # the smallest page size of the platforms write watches run on


def _native_watch():
    """The native module when it can watch writes, else None."""
    native = codecs.backend
    return native if getattr(native, "watch_writes", None) and \
        native.features().get("write_watch") else None


def _local(t: torch.Tensor) -> torch.Tensor:
    dt = dtensor_type()
    return t.to_local() if dt is not None and isinstance(t, dt) else t


def arm(t: torch.Tensor):
    """Start watching a tensor to be copied lazily: its ``_Pages`` (CPU), None (CUDA: its
    counters only), or False when it cannot be watched and must be copied at the call (no
    native core, not dense, under two pages, or the pages could not be protected)."""
    local = _local(t)
    if local.device.type == "cuda":
        return None
    if (_WATCH is None or local.device.type != "cpu" or not local.is_contiguous()
            or local.is_conj() or local.is_neg()
            or local.numel() * local.element_size() < 2 * PAGE):
        return False
    pages = _Pages(local)
    return pages if pages.id >= 0 else False


class _Pages:
    """The write watch over one CPU tensor's whole pages, and its edges kept by value."""

    def __init__(self, t: torch.Tensor):
        flat = t.detach().reshape(-1)
        ptr, size = flat.data_ptr(), flat.element_size()
        lo = -(-ptr // PAGE) * PAGE
        hi = (ptr + flat.numel() * size) // PAGE * PAGE
        self.head = flat[:(lo - ptr) // size].clone()
        self.tail_at = (hi - ptr) // size
        self.tail = flat[self.tail_at:].clone()
        self.id = _WATCH.watch_writes(lo, hi)
        self.written: bool | None = None if self.id >= 0 else False  # known once unwatched

    def restore_edges(self, dst: torch.Tensor, start: int, count: int) -> None:
        """``dst`` holds elements [start, start + count): put the edges' values at the call."""
        end, h = start + count, self.head.numel()
        if start < h:
            dst[:min(h, end) - start].copy_(self.head[start:min(h, end)])
        if end > self.tail_at:
            at = max(start, self.tail_at)
            dst[at - start:].copy_(self.tail[at - self.tail_at:end - self.tail_at])

    def unwatch(self) -> bool:
        """End the watch (once); whether anything wrote the pages meanwhile."""
        if self.written is None:
            self.written = _WATCH.unwatch_writes(self.id) == 1
        return self.written


class Watch:
    """One save's lazily copied pieces: their versions at the call, which guard waits for which,
    and the step pre-hooks."""

    def __init__(self, guards: list[Optimizer], names: list[str], tensors: list[torch.Tensor],
                 owned: list[tuple[set, list]], pages: list | None = None):
        self.guards, self.names, self.tensors = guards, names, tensors
        self.pages = pages or [None] * len(tensors)  # _Pages of each (arm), None on CUDA
        self.owners = [g for g, _ in owned]
        self.witnesses = [[t, *w] for t, (_, w) in zip(tensors, owned)]
        self.versions = [self._versions(i) for i in range(len(tensors))]  # at the call
        self.remaining = [0] * len(guards)
        for owned in self.owners:
            for g in owned:
                self.remaining[g] += 1
        self.events = [threading.Event() for _ in guards]
        for g, n in enumerate(self.remaining):
            if n == 0:
                self.events[g].set()
        self.lock = threading.Lock()
        self.hooks: list = []
        self.wait_seconds = 0.0

    def _versions(self, i: int) -> tuple[int, ...]:
        return tuple(t._version for t in self.witnesses[i])

    def check(self, i: int) -> None:
        """Raise StateChangedError when lazy piece ``i`` changed since the call."""
        now = self._versions(i)
        written = self.pages[i] is not None and self.pages[i].unwatch()
        if now != self.versions[i] or written:
            how = (f"versions {list(self.versions[i])} -> {list(now)}" if now != self.versions[i]
                   else "written through an alias such as .data")
            name, guards = self.names[i], ", ".join(
                type(self.guards[g]).__name__ for g in sorted(self.owners[i]))
            raise StateChangedError(
                f"{name}: changed in place while async_save was still copying it ({how}); "
                f"nothing was committed. It is guarded by {guards}, "
                f"whose step() waits for the copy: change it only inside optimizer.step(), call "
                f"handle.wait_staged() before changing it another way, or leave its optimizer "
                f"out of guard= and of the state so that it is copied before async_save returns",
                tensor=name)

    def restore_edges(self, i: int, dst: torch.Tensor, start: int, count: int) -> None:
        """Lazy piece ``i``'s elements [start, start + count) were copied into ``dst``: put
        back the values at the call of those the page watch does not cover."""
        if self.pages[i] is not None:
            self.pages[i].restore_edges(dst, start, count)

    def copied(self, i: int) -> None:
        """Lazy piece ``i`` is in the arena: check it; when it completes a guard, check all of
        that guard's pieces once more and release its step.

        The version counter moves when an in-place op ends, so an op that overlaps a copy may
        move it only after that copy's own check; the second check, made while the guard's step
        is still held (no legitimate change can have happened yet), closes that window for all
        but the guard's last piece.
        """
        self.check(i)
        done = []
        with self.lock:
            for g in self.owners[i]:
                self.remaining[g] -= 1
                if self.remaining[g] == 0:
                    done.append(g)
        for g in done:
            for j, owned in enumerate(self.owners):
                if g in owned:
                    self.check(j)
            self.events[g].set()

    def release(self) -> None:
        """Staging ended (done or failed): no hook waits any longer, no page is watched."""
        for pages in self.pages:
            if pages is not None:
                pages.unwatch()
        for e in self.events:
            e.set()

    def wait(self, g: int | None, timeout: float | None) -> bool:
        """Block until guard ``g``'s copies (all copies when None) are done; True if they are."""
        t0 = time.perf_counter()
        events = self.events if g is None else [self.events[g]]
        end = None if timeout is None else t0 + timeout
        ok = all(e.wait(None if end is None else max(end - time.perf_counter(), 0))
                 for e in events)
        with self.lock:
            self.wait_seconds += time.perf_counter() - t0
        return ok

    def install(self) -> None:
        """A step pre-hook on each guard that has lazily copied tensors in this save."""
        for g, opt in enumerate(self.guards):
            if not self.events[g].is_set():
                self.hooks.append(opt.register_step_pre_hook(self._hook(g)))

    def _hook(self, g: int):
        state = {"retired": False}

        def wait_for_copies(optimizer, args, kwargs):
            if not state["retired"]:
                self.wait(g, None)
                state["retired"] = True
        return wait_for_copies

    def remove_hooks(self) -> None:
        """Unregister the hooks (called from the training thread, outside ``step()``)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []


_WATCH = _native_watch()
