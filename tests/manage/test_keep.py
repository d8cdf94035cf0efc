"""Keep rules and KeepFull as pure functions of steps and metrics; milestones through the
manager."""

import pytest
import torch

import shardckpt
from shardckpt.manage.keep import KeepContext, kept
from shardckpt.policy import (EveryNSteps, KeepBest, KeepEvery, KeepFull, KeepLast, KeepSteps)

STEPS = (100, 200, 300, 400, 500, 600)
METRICS = {100: {"loss": 5.0}, 200: {"loss": 1.0}, 300: {"loss": 3.0}, 400: None,
           500: {"loss": 2.0}, 600: {"loss": 4.0}}


def _ctx(monitor="loss", mode="min"):
    return KeepContext(STEPS, METRICS, monitor, mode)


def test_each_rule_and_their_combinations():
    assert KeepLast(2).select(_ctx()) == {500, 600}
    assert KeepBest(2).select(_ctx()) == {200, 500}
    assert KeepBest(1, "loss", "max").select(_ctx()) == {100}
    assert KeepEvery(300).select(_ctx()) == {300, 600}
    assert KeepSteps([100, 700]).select(_ctx()) == {100}
    assert (KeepLast(1) | KeepEvery(200)).select(_ctx()) == {200, 400, 600}
    assert (KeepEvery(200) & KeepBest(3)).select(_ctx()) == {200}


def test_the_newest_and_the_protected_are_always_kept():
    assert kept(KeepSteps([100]), _ctx(), protect=[300]) == {100, 300, 600}
    assert kept(None, _ctx()) == set(STEPS)


def test_keep_full_keeps_the_newest_and_the_best_full():
    assert KeepFull(last=2, best=1).full(_ctx()) == {200, 500, 600}
    assert KeepFull(last=1).full(_ctx()) == {600}
    with pytest.raises(ValueError):
        KeepFull(last=0)


def test_keep_best_without_a_monitor_says_so():
    with pytest.raises(ValueError, match="needs a monitor"):
        KeepBest(1).select(_ctx(monitor=None))


def test_milestones_survive_retention(tmp_path):
    state = lambda s: {"w": torch.full((2,), float(s))}  # noqa: E731
    with shardckpt.CheckpointManager(tmp_path, save=EveryNSteps(10), keep=KeepLast(2) |
                                     KeepEvery(50), async_save=False,
                                     handle_preemption=False) as mgr:
        for step in range(1, 121):
            mgr.maybe_save(step, state(step))
        assert mgr.steps() == [50, 100, 110, 120]
