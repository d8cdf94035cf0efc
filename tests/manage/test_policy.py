"""Save rules: each rule alone, composed with | and &, and through CheckpointManager.maybe_save
(improvement writes nothing, epochs, shorthands, missing metrics, best across restarts)."""

import math
import os

import pytest
import torch

import shardckpt
from shardckpt.errors import MetricNotFoundError
from shardckpt.manage.policy import Facts, Tick
from shardckpt.policy import (AtSteps, Auto, Continuous, EveryNEpochs, EveryNSeconds, EveryNSteps,
                              Initial, KeepBest, KeepLast, OnImprovement)


def _tick(step=1, epoch=None, previous=None, metrics=None, flags=None, **facts):
    return Tick(step, epoch, previous, 0.0, Facts(**facts), flags or {}, metrics)


def _mgr(root, **kw):
    kw.setdefault("async_save", False)
    kw.setdefault("handle_preemption", False)
    return shardckpt.CheckpointManager(root, **kw)


def _state(step):
    return {"model": {"w": torch.full((4, 4), float(step))}, "optim": {"m": torch.ones(4)},
            "step": step}


def test_leaves_answer_with_their_reason():
    assert EveryNSteps(3).check(_tick(6)) == "periodic" and EveryNSteps(3).check(_tick(7)) is None
    assert AtSteps([5, 9]).check(_tick(9)) == "milestone" and AtSteps([5]).check(_tick(6)) is None
    assert Initial().check(_tick()) == "initial"
    assert Initial().check(_tick(has_checkpoint=True)) is None
    rule = EveryNSeconds(10)
    assert rule.local_flags(15.0, Facts(last_save=4.0)) == (1,)
    assert rule.local_flags(13.0, Facts(last_save=4.0)) == (0,)
    assert rule.check(_tick(flags={id(rule): (1,)})) == "periodic"
    cont = Continuous(5)
    assert cont.local_flags(10.0, Facts(last_save=0.0, busy=True)) == (1, 1)
    assert cont.check(_tick(flags={id(cont): (1, 1)})) is None
    assert cont.check(_tick(flags={id(cont): (1, 0)})) == "continuous"


@pytest.mark.parametrize("previous,epoch,fires", [
    (None, 0, False), (None, 1, True), (0, 1, True), (1, 1, False), (0.99, 1.0, True),
    (1.5, 1.75, False), (None, 1.5, False), (1, 2, True)])
def test_every_epoch_fires_when_an_epoch_is_completed(previous, epoch, fires):
    assert (EveryNEpochs(1).check(_tick(epoch=epoch, previous=previous)) == "epoch") is fires


def test_every_two_epochs():
    rule = EveryNEpochs(2)
    fired = [e for e in range(1, 7) if rule.check(_tick(epoch=e, previous=e - 1))]
    assert fired == [2, 4, 6]


@pytest.mark.parametrize("mode,best,value,delta,fires", [
    ("min", None, 5.0, 0.0, True), ("min", 1.0, 0.9, 0.0, True), ("min", 1.0, 1.0, 0.0, False),
    ("min", 1.0, 0.95, 0.1, False), ("max", 1.0, 1.2, 0.1, True), ("max", 1.0, 0.5, 0.0, False),
    ("min", 1.0, math.nan, 0.0, False)])
def test_improvement_needs_more_than_min_delta_in_the_right_direction(mode, best, value, delta,
                                                                     fires):
    rule = OnImprovement("val", mode=mode, min_delta=delta)
    tick = _tick(metrics={"val": value}, best=lambda m, how: best)
    assert (rule.check(tick) == "improvement") is fires


def test_composition_short_circuits_in_order():
    rule = EveryNEpochs(1) & OnImprovement("val_loss")
    # Not an epoch end: the metric is never read, so its absence is no error.
    assert rule.check(_tick(epoch=0.5, previous=0.25, metrics={})) is None
    with pytest.raises(MetricNotFoundError, match="val_loss.*metrics passed: 'loss'"):
        rule.check(_tick(epoch=1, previous=0.5, metrics={"loss": 1.0}))
    assert rule.check(_tick(epoch=1, previous=0.5, metrics={"val_loss": 1.0})) == \
        "epoch+improvement"
    either = EveryNSteps(10) | AtSteps([3])
    assert [s for s in range(1, 21) if either.check(_tick(s))] == [3, 10, 20]
    assert isinstance(MetricNotFoundError("x"), KeyError)


def test_bad_arguments_are_refused():
    for make in (lambda: EveryNSteps(0), lambda: EveryNEpochs(-1), lambda: OnImprovement("v", "up"),
                 lambda: KeepLast(0), lambda: Auto(10, 5), lambda: EveryNSeconds(0)):
        with pytest.raises(ValueError):
            make()
    with pytest.raises(TypeError):
        EveryNSteps(1) | KeepLast(1)


def test_on_improvement_writes_nothing_when_the_metric_does_not_improve(tmp_path, monkeypatch):
    removals = []
    with _mgr(tmp_path, save=OnImprovement("val_loss"), keep=KeepLast(5)) as mgr:
        monkeypatch.setattr(mgr, "_apply_retention", lambda: removals.append(1))
        before = set(os.listdir(tmp_path))
        saved = [s for s, v in enumerate([3.0, 2.0, 2.5, 2.0, 1.0, 4.0], 1)
                 if mgr.maybe_save(s, _state(s), {"val_loss": v})]
        assert saved == [1, 2, 5] and mgr.steps() == [1, 2, 5]
        assert len(removals) == 3  # one retention pass per save, none for the others
        grown = set(os.listdir(tmp_path)) - before
        assert {n for n in grown if n.startswith("step-")} == {"step-00000001", "step-00000002",
                                                               "step-00000005"}
        assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_the_best_value_survives_a_restart(tmp_path):
    with _mgr(tmp_path, save=OnImprovement("acc", mode="max")) as mgr:
        assert mgr.maybe_save(1, _state(1), {"acc": 0.5})
        assert mgr.maybe_save(2, _state(2), {"acc": 0.7})
    with _mgr(tmp_path, save=OnImprovement("acc", mode="max")) as mgr:
        assert not mgr.maybe_save(3, _state(3), {"acc": 0.6})  # below 0.7 from the root
        assert mgr.maybe_save(4, _state(4), {"acc": 0.8})
    assert [s for s in sorted(os.listdir(tmp_path)) if s.startswith("step-")] == \
        ["step-00000001", "step-00000002", "step-00000004"]


def test_a_missing_metric_is_an_error_naming_it(tmp_path):
    with _mgr(tmp_path, save=OnImprovement("val_loss")) as mgr:
        with pytest.raises(MetricNotFoundError, match="'val_loss' is missing at step 1"):
            mgr.maybe_save(1, _state(1), {"train_loss": 1.0})
        assert mgr.steps() == []


def test_epochs_are_saved_recorded_and_restored(tmp_path):
    with _mgr(tmp_path, save=EveryNEpochs(1)) as mgr:
        step = 0
        for epoch in range(3):
            for _ in range(4):
                step += 1
                assert not mgr.maybe_save(step, _state(step), epoch=epoch)
            assert mgr.maybe_save(step, _state(step), {"val": 1.0}, epoch=epoch + 1)
        assert mgr.steps() == [4, 8, 12]
    with _mgr(tmp_path, save=EveryNEpochs(1)) as mgr:
        state = _state(0)
        got = mgr.restore(state)
        assert got == 12 and got.epoch == 3 and got + 1 == 13 and isinstance(got, int)
        assert not mgr.maybe_save(13, _state(13), epoch=3)  # epoch 3 was saved already
    rows = {r["step"]: r for r in mgr.history()}
    assert [rows[s]["epoch"] for s in (4, 8, 12)] == [1, 2, 3]


def test_shorthands_build_the_same_rules(tmp_path):
    with _mgr(tmp_path / "a", every_n_steps=2, every_n_seconds=100, keep_last=2, keep_best=1,
              monitor="loss") as mgr:
        assert repr(mgr.save_rule) == repr(EveryNSteps(2) | EveryNSeconds(100))
        assert repr(mgr.keep_rule) == repr(KeepLast(2) | KeepBest(1, "loss", "min"))
    with pytest.raises(ValueError, match="not both"):
        _mgr(tmp_path / "b", every_n_steps=2, save=EveryNSteps(2))


def test_initial_and_milestones(tmp_path):
    with _mgr(tmp_path, save=Initial() | AtSteps([5]) | EveryNSteps(100)) as mgr:
        saved = [s for s in range(1, 8) if mgr.maybe_save(s, _state(s))]
    assert saved == [1, 5]
    with _mgr(tmp_path, save=Initial()) as mgr:  # the root has a checkpoint now
        assert not mgr.maybe_save(8, _state(8))


def test_preemption_and_manual_saves_ignore_the_rules(tmp_path):
    with _mgr(tmp_path, save=OnImprovement("v")) as mgr:
        mgr.save(3, _state(3))  # the final save: no metric needed
        assert mgr.steps() == [3]


def test_continuous_saves_whenever_none_is_in_flight(tmp_path):
    now = [0.0]
    with _mgr(tmp_path, save=Continuous(min_interval_s=2), clock=lambda: now[0]) as mgr:
        saved = []
        for step in range(1, 9):
            now[0] += 1.0
            if mgr.maybe_save(step, _state(step)):
                saved.append(step)
    assert saved == [2, 4, 6, 8]
