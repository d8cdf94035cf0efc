"""CheckpointManager on 2 gloo ranks: decisions that one rank sees are made by all."""

import os
import signal

import torch

import shardckpt
from shardckpt.testing import flip_byte, run_with_ranks


def _state(world: int, value: float) -> dict:
    """A DTensor sharded over the ranks, so each rank reads its own data file on load."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    return {"w": distribute_tensor(torch.full((8, 4), float(value)), mesh, [Shard(0)]), "step": 0}


def _signal_on_one_rank(rank, world, root):
    mgr = shardckpt.CheckpointManager(root, every_n_steps=100, preemption_signals=(signal.SIGUSR1,),
                                      grace_seconds=60)
    saved = []
    for step in range(1, 6):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)  # twice, as under torchrun
        if mgr.maybe_save(step, _state(world, step)):
            saved.append(step)
        if mgr.preempted:
            break
    mgr.close()
    return saved, mgr.preempted, mgr.steps()


def test_a_signal_on_one_rank_makes_every_rank_save_and_stop(tmp_path):
    results = run_with_ranks(2, _signal_on_one_rank, str(tmp_path), timeout=90)
    # Agreed one call late (the reduction runs during the next step): both act at step 4.
    assert [r.value for r in results] == [([4], True, [4])] * 2
    full = shardckpt.load_full(tmp_path / "step-00000004")
    assert torch.equal(full["w"], torch.full((8, 4), 4.0))


def _timed(rank, world, root):
    now = [0.0]
    mgr = shardckpt.CheckpointManager(root, every_n_seconds=5, clock=lambda: now[0],
                                      async_save=False, handle_preemption=False)
    saved = []
    for step in range(1, 7):
        now[0] += 3.0 if rank == 0 else 1.0  # only rank 0's clock reaches 5 s (at steps 2, 5)
        if mgr.maybe_save(step, _state(world, step)):
            saved.append(step)
    mgr.close()
    return saved


def test_timed_saves_follow_the_fastest_clock_on_every_rank(tmp_path):
    results = run_with_ranks(2, _timed, str(tmp_path), timeout=90)
    # Rank 0 finds a save due at steps 2 and 5; every rank saves one call later.
    assert results[0].value == results[1].value == [3, 6]


def _save_then_restore(rank, world, root, phase):
    mgr = shardckpt.CheckpointManager(root, async_save=False, handle_preemption=False)
    if phase == "save":
        for step in (1, 2):
            mgr.save(step, _state(world, step))
        mgr.close()
        return mgr.steps()
    state = _state(world, 0.0)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = mgr.restore(state)
    mgr.close()
    return step, state["w"].full_tensor(), len(caught)


def test_restore_falls_back_together_when_one_ranks_shard_is_corrupt(tmp_path):
    run_with_ranks(2, _save_then_restore, str(tmp_path), "save", timeout=90)
    data = tmp_path / "step-00000002" / "data"
    damaged = [p for p in data.iterdir() if p.name.startswith("rank-00001")
               and p.stat().st_size > 16]
    assert damaged
    for p in damaged:
        flip_byte(p, p.stat().st_size - 3)
    results = run_with_ranks(2, _save_then_restore, str(tmp_path), "restore", timeout=90)
    for r in results:
        step, w, warned = r.value
        assert step == 1 and torch.equal(w, torch.full((8, 4), 1.0)) and warned == 1
