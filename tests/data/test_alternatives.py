"""The failure modes docs/resuming.md counts for the usual alternatives to a global data position,
measured with the real samplers: an epoch of 120 samples, a global batch of 12, preempted after
5 steps, then resumed (rank 0's state on every new rank where the state is per rank)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data import DistributedSampler as TorchSampler

from shardckpt.data import DistributedSampler

N, BATCH, STEPS = 120, 12, 5


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return i


def first_run(world, cls, workers=0, track=False):
    """Indices the loop consumed in STEPS steps on ``world`` ranks, and rank 0's state."""
    consumed, state = [], None
    for rank in range(world):
        sampler = cls(Indices(), world, rank, seed=0)
        loader = DataLoader(Indices(), batch_size=BATCH // world, sampler=sampler,
                            num_workers=workers, prefetch_factor=2 if workers else None)
        batches = iter(sampler.track(loader) if track else loader)
        for _ in range(STEPS):
            consumed += next(batches).tolist()
        if rank == 0 and hasattr(sampler, "state_dict"):
            state = sampler.state_dict()
    return consumed, state


def resumed(world, cls, state=None, skip=0):
    """Indices the rest of the epoch gives ``world`` new ranks."""
    out = []
    for rank in range(world):
        sampler = cls(Indices(), world, rank, seed=0)
        if state is not None:
            sampler.load_state_dict(state)
        out += list(sampler)[skip:]
    return out


def repeated_and_skipped(before, after) -> tuple[int, int]:
    counts = collections.Counter(before + after)
    return sum(c - 1 for c in counts.values()), N - len(counts)


def test_no_state_restarts_the_epoch():
    before, _ = first_run(4, TorchSampler)
    assert repeated_and_skipped(before, resumed(4, TorchSampler)) == (60, 0)


@pytest.mark.parametrize("old,new", [(4, 4), (4, 3), (2, 4)])
def test_skipping_the_steps_done_is_exact_with_a_fixed_global_batch(old, new):
    before, _ = first_run(old, TorchSampler)
    after = resumed(new, TorchSampler, skip=STEPS * BATCH // new)
    assert repeated_and_skipped(before, after) == (0, 0)


@pytest.mark.parametrize("old,new,counts", [(4, 4, (0, 0)), (4, 3, (15, 0)), (4, 2, (30, 0)),
                                            (2, 4, (0, 60))])
def test_a_per_rank_offset_on_another_world_size_repeats_or_skips(old, new, counts):
    sdl = pytest.importorskip("torchdata.stateful_dataloader.sampler")
    before, state = first_run(old, sdl.StatefulDistributedSampler)
    after = resumed(new, sdl.StatefulDistributedSampler, state)
    assert repeated_and_skipped(before, after) == counts


def test_counting_indices_handed_to_prefetching_workers_skips_them():
    sdl = pytest.importorskip("torchdata.stateful_dataloader.sampler")
    before, state = first_run(4, sdl.StatefulDistributedSampler, workers=2)
    after = resumed(4, sdl.StatefulDistributedSampler, state)
    assert repeated_and_skipped(before, after) == (0, 48)  # 4 batches of 12 fetched ahead


@pytest.mark.parametrize("old,new", [(4, 4), (4, 3), (4, 2), (2, 4)])
def test_the_global_position_counted_as_consumed_is_exact(old, new):
    before, state = first_run(old, DistributedSampler, workers=2, track=True)
    after = resumed(new, DistributedSampler, state)
    assert repeated_and_skipped(before, after) == (0, 0)
