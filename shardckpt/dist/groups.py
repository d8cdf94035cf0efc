"""Every gloo process group shardckpt makes beside the training's: the shared load's group, the
manager's agreement group and the local tier's groups, all made here."""

from __future__ import annotations

import warnings
from datetime import timedelta

__all__ = ["gloo_group", "shared_group", "forget_shared_group", "RankAgreement"]

_SHARED: dict = {}  # the gloo group of the current default process group, per timeout


def gloo_group(timeout: float):
    """A new gloo group over every rank that gives up after ``timeout`` seconds: it carries host
    bytes whatever backend the training uses, and no training collective ever runs on it."""
    import torch.distributed as dist
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))


def shared_group(timeout: float):
    """The loads' gloo group over every rank, made once per default group and timeout."""
    import torch.distributed as dist
    world = dist.group.WORLD
    cached = _SHARED.get(timeout)
    if cached is None or cached[0] is not world:
        cached = _SHARED[timeout] = (world, gloo_group(timeout))
    return cached[1]


def forget_shared_group() -> None:
    """Drop the loads' cached group: a group whose peer died is never reused."""
    _SHARED.clear()


class RankAgreement:
    """Agreement among the ranks in small integer reductions over a dedicated gloo group (the
    manager's flags and verdicts; a no-op for one process)."""

    def __init__(self, timeout: float):
        import torch.distributed as dist
        self.dist = dist if (dist.is_available() and dist.is_initialized()
                             and dist.get_world_size() > 1) else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.group = None
        self._pending = None  # (work, tensor) of max_of_previous
        if self.dist:
            self.group = gloo_group(timeout)

    def max(self, *values: int) -> list[int]:
        """Element-wise maximum over the ranks (blocking)."""
        if not self.dist:
            return list(values)
        import torch
        t = torch.tensor(values, dtype=torch.int64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def collect(self, size: int) -> list[int]:
        """The element-wise maximum of what every rank ``post``-ed last (zeros before any).

        Waiting for a collective at every training step would stall each rank until the
        slowest arrives; instead the reduction posted at one call runs in the background
        during the next training step and is collected at the call after. A decision thus lags
        one call behind the local flags, and is the same on every rank at the same call.
        """
        if self._pending is None:
            return [0] * size
        work, t = self._pending
        work.wait()
        self._pending = None
        return t.tolist()

    def post(self, *values: int) -> None:
        """Start the background reduction that the next ``collect`` returns."""
        import torch
        t = torch.tensor(values, dtype=torch.int64)
        self._pending = (self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX, group=self.group,
                                              async_op=True), t)

    def rank0_list(self, values: list[int]) -> list[int]:
        """Rank 0's list of ints, on every rank."""
        if not self.dist:
            return values
        import torch
        n = torch.tensor([len(values)], dtype=torch.int64)
        self.dist.broadcast(n, src=0, group=self.group)
        t = torch.tensor(values if self.rank == 0 else [0] * int(n), dtype=torch.int64)
        self.dist.broadcast(t, src=0, group=self.group)
        return t.tolist()

    def close(self) -> None:
        if self._pending is not None:
            try:
                self._pending[0].wait()
            except RuntimeError as exc:  # a peer died: nothing is left to agree on
                warnings.warn(f"shardckpt: the manager's last flag round failed at close "
                              f"(a rank is gone?): {exc}", stacklevel=3)
            self._pending = None
        if self.group is not None:
            self.dist.destroy_process_group(self.group)
            self.group = None
