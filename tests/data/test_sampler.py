"""shardckpt.data.DistributedSampler: torch's indices when uninterrupted, one global position that
resumes on any world size, consumed (not prefetched) batches with real DataLoader workers, epoch
boundaries, drop_last and uneven tails, and the rules that refuse a position that would mean
other samples.

Ranks are simulated in one process (W samplers with explicit ``rank`` / ``num_replicas``, each
with its own DataLoader, stepped in lockstep as data-parallel ranks are); a preemption takes
rank 0's state (every rank's is the same, which the helper asserts) and builds the next world
from it. tests/data/test_preempt.py does the same with real processes and signals.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data import DistributedSampler as TorchSampler

import shardckpt
from shardckpt.data import DistributedSampler
from shardckpt.errors import DataPositionError, StateMismatchError
from shardckpt.testing import run_with_ranks


class Indices(torch.utils.data.Dataset):
    """Item i is i: a batch is the indices it consumed."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator()
    gen.manual_seed(seed + epoch)
    return torch.randperm(n, generator=gen).tolist()


def train(n, batch, worlds, stops, *, workers=0, epochs=2, drop_last=True, loader_cls=DataLoader,
          save_loader=False, seed=1):
    """Global batches (sorted index lists) per epoch of a job that runs on ``worlds[j]`` ranks
    until global step ``stops[j]`` (then is preempted: rank 0's state starts the next world)."""
    state, step, seen = None, 0, {}
    for world, stop in zip(worlds, stops):
        samplers = [DistributedSampler(Indices(n), world, r, seed=seed, drop_last=drop_last)
                    for r in range(world)]
        extra = {"num_workers": workers, "prefetch_factor": 2} if workers else {}
        loaders = [loader_cls(Indices(n), batch_size=batch // world, sampler=s,
                              drop_last=drop_last, **extra) for s in samplers]
        for s, loader in zip(samplers, loaders):
            if state is not None:
                (loader if save_loader else s).load_state_dict(state)
        epoch = state_epoch(state) if state is not None else 0
        while epoch < epochs:
            for s in samplers:
                s.set_epoch(epoch)
            its = [iter(loader) if save_loader else s.track(loader)
                   for s, loader in zip(samplers, loaders)]
            for batches in zip(*its):
                step += 1
                seen.setdefault(epoch, []).append(sorted(i for b in batches for i in b.tolist()))
                if step == stop:
                    break
            else:
                epoch += 1
                continue
            states = [(loader if save_loader else s).state_dict()
                      for s, loader in zip(samplers, loaders)]
            if not save_loader:
                assert all(sd == states[0] for sd in states), states
            state = states[0]
            break
    return seen


def state_epoch(state) -> int:
    """The sampler's epoch inside a sampler's or a StatefulDataLoader's state."""
    if "position" in state:
        return state["epoch"]
    found = [state_epoch(v) for v in state.values() if isinstance(v, dict)]
    return next((e for e in found if e is not None), None)


def uninterrupted(n, batch, epochs=2, seed=1, drop_last=True):
    return {e: [sorted(permutation(n, seed, e)[k:k + batch])
                for k in range(0, n - batch + 1 if drop_last else n, batch)]
            for e in range(epochs)}


@pytest.mark.parametrize("n", [120, 121, 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_uninterrupted_it_yields_torchs_indices(n, drop_last):
    for world in (1, 3, 4):
        for rank in range(world):
            for epoch in (0, 1):
                ours = DistributedSampler(Indices(n), world, rank, seed=7, drop_last=drop_last)
                theirs = TorchSampler(Indices(n), world, rank, seed=7, drop_last=drop_last)
                ours.set_epoch(epoch), theirs.set_epoch(epoch)
                assert list(ours) == list(theirs) and len(ours) == len(theirs)


@pytest.mark.parametrize("workers", [0, 2])
def test_4_then_2_then_3_ranks_consume_every_index_once_in_the_same_global_batches(workers):
    """Preempted at steps 7 (epoch 0) and 13 (epoch 1): every index of each epoch exactly once,
    and every global batch the one an uninterrupted run takes."""
    got = train(120, 12, [4, 2, 3], [7, 13, None], workers=workers)
    assert got == uninterrupted(120, 12)
    for epoch in got.values():
        assert sorted(i for b in epoch for i in b) == list(range(120))


def test_the_state_counts_batches_the_loop_took_not_those_the_workers_fetched():
    sampler = DistributedSampler(Indices(64), 2, 0, seed=0)
    loader = DataLoader(Indices(64), batch_size=2, sampler=sampler, num_workers=2,
                        prefetch_factor=2)
    tracked = sampler.track(loader)
    for _ in range(3):
        next(tracked)
    assert sampler.state_dict()["position"] == 3 * 2 * 2  # 3 batches of 2 on 2 ranks
    # Without track() the sampler only knows what the loader drew: 4 batches ahead.
    plain = DistributedSampler(Indices(64), 2, 0, seed=0)
    it = iter(DataLoader(Indices(64), batch_size=2, sampler=plain, num_workers=2,
                         prefetch_factor=2))
    for _ in range(3):
        next(it)
    assert plain.state_dict()["position"] > 3 * 2 * 2


def test_a_checkpoint_at_the_end_of_an_epoch_resumes_at_the_next():
    sampler = DistributedSampler(Indices(24), 2, 0, seed=0, drop_last=True)
    loader = DataLoader(Indices(24), batch_size=3, sampler=sampler, drop_last=True)
    assert len(list(sampler.track(loader))) == 4
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, 24)
    again = DistributedSampler(Indices(24), 4, 1, seed=0, drop_last=True)
    again.load_state_dict(state)
    again.set_epoch(0)  # the loop's `for epoch in range(sampler.epoch, ...)` does this
    assert list(again) == []
    again.set_epoch(1)
    assert list(again) == permutation(24, 0, 1)[1::4]
    assert list(again) == permutation(24, 0, 1)[1::4]  # later passes are full, as torch's


def test_set_epoch_of_another_epoch_drops_the_loaded_position():
    sampler = DistributedSampler(Indices(20), 2, 1, seed=0)
    sampler.load_state_dict({**sampler.state_dict(), "position": 10})
    assert len(sampler) == 5
    sampler.set_epoch(3)
    assert list(sampler) == permutation(20, 0, 3)[1::2]


def test_uneven_tail_without_drop_last_pads_with_the_epochs_first_indices():
    """125 samples, global batch 12: the last global batch has 5 samples; at 2 ranks it is padded
    to 6 with the epoch's first index, as torch pads; every index is consumed."""
    got = train(125, 12, [4, 2], [5, None], epochs=1, drop_last=False)
    flat = [i for b in got[0] for i in b]
    assert sorted(set(flat)) == list(range(125))
    extra = sorted(flat)
    for i in set(flat):
        extra.remove(i)
    assert extra == [permutation(125, 1, 0)[0]]


def test_uneven_tail_with_drop_last_is_dropped_whatever_the_world_size():
    """With drop_last on the sampler and the loader, an epoch is floor(N / B) full global batches
    on any world size dividing B: the same batches as an uninterrupted run."""
    for worlds in ([4, 2], [2, 3], [1, 4]):
        got = train(125, 12, worlds, [4, None], epochs=1)
        assert got == uninterrupted(125, 12, epochs=1)


def test_a_world_size_that_does_not_split_the_global_batch_raises():
    first = DistributedSampler(Indices(120), 4, 0)
    next(first.track(DataLoader(Indices(120), batch_size=3, sampler=first)))
    state = first.state_dict()
    assert state["global_batch"] == 12
    odd = DistributedSampler(Indices(120), 5, 0)
    odd.load_state_dict(state)
    with pytest.raises(DataPositionError, match="5 ranks cannot split it evenly"):
        next(odd.track(DataLoader(Indices(120), batch_size=2, sampler=odd)))
    assert isinstance(DataPositionError(), StateMismatchError)  # fatal on restore
    changed = DistributedSampler(Indices(120), 2, 0)
    changed.load_state_dict(state)
    with pytest.raises(DataPositionError, match="use 6 per rank"):
        next(changed.track(DataLoader(Indices(120), batch_size=4, sampler=changed)))
    on_purpose = changed.track(DataLoader(Indices(120), batch_size=4, sampler=changed),
                               allow_new_batch=True)
    assert next(on_purpose).tolist() == permutation(120, 0, 0)[12:20:2]


@pytest.mark.parametrize("key,value", [("size", 99), ("seed", 5), ("shuffle", False),
                                       ("position", 121), ("position", -1)])
def test_a_position_in_another_permutation_is_refused(key, value):
    state = DistributedSampler(Indices(120), 2, 0).state_dict()
    with pytest.raises(DataPositionError, match=key):
        DistributedSampler(Indices(120), 3, 1).load_state_dict({**state, key: value})
    del state["position"]
    with pytest.raises(DataPositionError, match="position"):
        DistributedSampler(Indices(120), 3, 1).load_state_dict(state)


def test_stateful_dataloader_saved_itself_or_through_the_sampler():
    """torchdata's StatefulDataLoader with 2 workers: saving the loader (it snapshots the sampler
    as it dispatches each batch) and saving the sampler with track() both resume exactly."""
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    want = uninterrupted(120, 12)
    for save_loader in (True, False):
        got = train(120, 12, [4, 2, 3], [7, 13, None], workers=2,
                    loader_cls=sdl.StatefulDataLoader, save_loader=save_loader)
        assert got == want, save_loader


def _save_after_3_batches(rank, world, path, stateful):
    sampler = DistributedSampler(Indices(120), seed=1, drop_last=True)  # the group's rank/world
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader
        loader = StatefulDataLoader(Indices(120), batch_size=12 // world, sampler=sampler,
                                    drop_last=True)
        batches, state = iter(loader), {"loader": loader}
    else:
        loader = DataLoader(Indices(120), batch_size=12 // world, sampler=sampler,
                            drop_last=True)  # (ranks here are daemons: no workers)
        batches, state = sampler.track(loader), {"data": sampler}
    for _ in range(3):
        next(batches)
    shardckpt.save(state, path)


def _next_two_global_batches(rank, world, path, stateful):
    sampler = DistributedSampler(Indices(120), seed=1, drop_last=True)
    loader_cls = DataLoader
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader as loader_cls
    loader = loader_cls(Indices(120), batch_size=12 // world, sampler=sampler, drop_last=True)
    state = {"loader": loader} if stateful else {"data": sampler}
    shardckpt.load(state, path, per_rank="rank0" if stateful else "error")
    batches = iter(loader) if stateful else sampler.track(loader)
    return [next(batches).tolist() for _ in range(2)]


@pytest.mark.parametrize("stateful", [False, True])
def test_saved_on_4_ranks_through_shardckpt_resumed_on_3(tmp_path, stateful):
    """The sampler's state is one value in the checkpoint (every rank's is the same), so 3 ranks
    load it with the default per_rank="error"; a StatefulDataLoader's own state has per-rank
    values and loads with per_rank="rank0"."""
    if stateful:
        pytest.importorskip("torchdata.stateful_dataloader")
    path = str(tmp_path / "ckpt")
    run_with_ranks(4, _save_after_3_batches, path, stateful)
    if not stateful:
        assert shardckpt.load_full(path, rank=3) == shardckpt.load_full(path, rank=0)
        assert shardckpt.load_full(path)["data"]["position"] == 36
    got = [r.value for r in run_with_ranks(3, _next_two_global_batches, path, stateful)]
    order = permutation(120, 1, 0)
    for k in range(2):
        assert sorted(i for own in got for i in own[k]) == sorted(order[36 + 12 * k:48 + 12 * k])
