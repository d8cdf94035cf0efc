"""The data position as one global cursor: a DistributedSampler whose state is the job's place in
the epoch's permutation, so a checkpoint resumes exactly on any number of ranks."""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import distributed as _torch_distributed

from ..errors import DataPositionError
from .workers import shield

#: Keys a checkpoint's sampler state must carry (older or foreign states are refused).
_KEYS = ("epoch", "position", "size", "seed", "shuffle", "global_batch")


class DistributedSampler(_torch_distributed.DistributedSampler):
    """A drop-in ``torch.utils.data.DistributedSampler`` with a world-size-free state.

    Rank ``r`` of ``W`` takes every ``W``-th index of the epoch's permutation, as torch's does,
    and an uninterrupted run yields exactly torch's indices. The state is global: the epoch and
    how many samples of its permutation the whole job has consumed. Every rank saves the same
    value, so the checkpoint holds one, and a load on another world size splits what is left of
    the epoch among the new ranks (rank ``r`` of ``W'`` continues with positions
    ``p + r, p + r + W', ...``): with a fixed global batch the global batches are the ones an
    uninterrupted run takes.

    Consumed, not fetched: a ``DataLoader`` with workers draws indices ahead of the loop. Iterate
    ``sampler.track(loader)`` instead of ``loader`` and the state counts the batches the loop
    took. A torchdata ``StatefulDataLoader`` saved itself needs nothing: it snapshots this
    sampler when it sends each batch to a worker and returns the snapshot of the last batch the
    loop received.

    Args:
        dataset: a map-style dataset (``len`` must stay constant across a resume).
        num_replicas: world size (default: the process group's).
        rank: this process's rank (default: the process group's).
        shuffle: permute each epoch with ``seed + epoch``.
        seed: the permutation's seed; must be the same on every rank and across resumes.
        drop_last: drop the epoch's tail that does not fill every rank (else pad by repeating
            the epoch's first indices), for what is left of the epoch at the current world size.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)
        self._start = 0          # global position this iteration starts from
        self._resume = False     # the next iteration starts at _start (a loaded state)
        self._length = self._share(0)
        self._yielded = 0        # indices of this iteration handed to the loader
        self._consumed = 0       # ... and taken by the loop (when tracked)
        self._tracked = False
        self._global_batch = 0   # per-rank batch x world size, once known

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[int]:
        return self._iterate()

    def __len__(self) -> int:
        """Indices the next (or current) iteration gives this rank."""
        return self._share(self._start if self._resume else 0)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; the epoch just loaded keeps its position.

        Args:
            epoch: the epoch's number (the permutation's seed is ``seed + epoch``).
        """
        if epoch != self.epoch:
            self.epoch, self._start, self._resume = epoch, 0, False
            self._yielded = self._consumed = 0
            self._length = self._share(0)

    def _iterate(self) -> Iterator[int]:
        # Lazy: an iterator made and dropped (torchdata makes one before loading) changes nothing.
        self._start = self._start if self._resume else 0
        self._resume = False
        self._yielded = self._consumed = 0
        self._length = self._share(self._start)
        for index in self._stream(self._start)[self.rank::self.num_replicas]:
            self._yielded += 1
            yield index

    def _share(self, start: int) -> int:
        """How many indices each rank takes of the epoch from global position ``start``."""
        left = len(self.dataset) - start
        return left // self.num_replicas if self.drop_last else -(-left // self.num_replicas)

    def _stream(self, start: int) -> list[int]:
        """The epoch's indices from ``start``, cut or padded to fill every rank equally."""
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        total = self._share(start) * self.num_replicas
        stream = order[start:start + total]
        if len(stream) < total:  # pad as torch does: the epoch's first indices, cyclically
            stream += (order * math.ceil(total / max(n, 1)))[:total - len(stream)]
        return stream

    # ------------------------------------------------------------------ consumption
    def track(self, loader: Iterable, *, allow_new_batch: bool = False) -> Iterator[Any]:
        """Iterate ``loader``, counting the batches the loop takes as consumed.

        A ``DataLoader`` with workers takes ``prefetch_factor x num_workers`` batches of
        indices ahead of the loop; the state then names what the training consumed.

        Args:
            loader: a ``DataLoader`` (or ``StatefulDataLoader``) over this sampler, with
                ``batch_size`` set (or a ``batch_sampler`` with a ``batch_size``).
            allow_new_batch: resume with a global batch (per-rank batch x world size) other
                than the checkpoint's; by default that raises, since the global batches would
                no longer be those of an uninterrupted run.

        Workers the loader starts from here on outlive a process-group SIGTERM until this
        process exits (:func:`~shardckpt.data.workers.preemption_safe`).

        Yields:
            the loader's batches.

        Raises:
            DataPositionError: the checkpoint's global batch does not split over this world
                size (or the per-rank batch changed it) and ``allow_new_batch`` is false.
        """
        batch = _batch_size(loader, self)
        self._check_batch(batch, allow_new_batch)
        shield(loader)
        self._tracked, self._global_batch = True, batch * self.num_replicas
        for item in loader:
            self._consumed = min(self._consumed + batch, self._length)
            yield item
        self._consumed = self._length  # a tail the loader dropped (drop_last) is passed too

    def _check_batch(self, batch: int, allow: bool) -> None:
        saved = self._global_batch
        if allow or not saved or batch * self.num_replicas == saved:
            return
        why = (f"the checkpoint's global batch is {saved} samples; "
               + (f"{self.num_replicas} ranks cannot split it evenly" if saved % self.num_replicas
                  else f"{batch} per rank on {self.num_replicas} ranks makes "
                       f"{batch * self.num_replicas}; use {saved // self.num_replicas} per rank")
               + " (or track(loader, allow_new_batch=True) to change it on purpose)")
        raise DataPositionError(mismatched=[("DistributedSampler.global_batch", why)])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The job's data position; the same on every rank that consumed in step.

        Returns:
            ``epoch``, ``position`` (samples of the epoch's permutation consumed by all ranks
            together), ``size``, ``seed``, ``shuffle`` and ``global_batch`` (0 when unknown).
        """
        taken = self._consumed if self._tracked else self._yielded
        position = len(self.dataset) if taken >= self._length else \
            self._start + taken * self.num_replicas
        return {"epoch": self.epoch, "position": position, "size": len(self.dataset),
                "seed": self.seed, "shuffle": self.shuffle, "global_batch": self._global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (of any world size) at the next iteration.

        Args:
            state: what :meth:`state_dict` returned on the saving ranks.

        Raises:
            DataPositionError: the state lacks a key, or the dataset's length, the seed or
                ``shuffle`` differ from the checkpoint's (the position would mean other
                samples).
        """
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise DataPositionError(missing=[f"DistributedSampler.{k}" for k in missing])
        here = {"size": len(self.dataset), "seed": self.seed, "shuffle": self.shuffle}
        wrong = [(f"DistributedSampler.{k}", f"checkpoint {state[k]!r}, this run {v!r}")
                 for k, v in here.items() if state[k] != v]
        if not 0 <= state["position"] <= len(self.dataset):
            wrong.append(("DistributedSampler.position",
                          f"{state['position']!r} is outside the epoch of {len(self.dataset)}"))
        if wrong:
            raise DataPositionError(mismatched=wrong)
        self.epoch, self._start, self._resume = int(state["epoch"]), int(state["position"]), True
        self._global_batch = int(state["global_batch"])
        self._yielded = self._consumed = 0
        self._length = self._share(self._start)


def _batch_size(loader, sampler: DistributedSampler) -> int:
    """The per-rank batch size of a DataLoader that draws from ``sampler``."""
    drawn = (getattr(loader, "sampler", None),
             getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    if hasattr(loader, "sampler") and sampler not in drawn:
        raise ValueError("track(loader): the loader draws from another sampler; pass "
                         "sampler=<this DistributedSampler> to the DataLoader")
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError("track() needs a DataLoader with a batch_size (or a batch_sampler "
                        f"with one); {type(loader).__name__} has none")
    return size
