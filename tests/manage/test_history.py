"""The root's history: one record per checkpoint (kept, demoted, removed) in ``mgr.history()``
and ``shardckpt ls --json``; failures counted from unclean ends; ``Auto``'s interval from the
measured costs and that failure history."""

import json

import pytest
import torch

import shardckpt
from shardckpt import cli
from shardckpt.manage import interval
from shardckpt.manage.policy import Facts
from shardckpt.policy import Auto, EveryNEpochs, EveryNSteps, KeepFull, KeepLast


def _state(step):
    return {"model": {"w": torch.full((16,), float(step))}, "optim": {"m": torch.ones(64)}}


def _mgr(root, **kw):
    kw.setdefault("async_save", False)
    kw.setdefault("handle_preemption", False)
    return shardckpt.CheckpointManager(root, **kw)


def test_one_record_per_checkpoint_in_history_and_ls(tmp_path, capsys):
    with _mgr(tmp_path, save=EveryNSteps(2) | EveryNEpochs(1), keep=KeepLast(3),
              demote=KeepFull(last=1), monitor="loss") as mgr:
        for step in range(1, 11):
            mgr.maybe_save(step, _state(step), {"loss": 10.0 - step}, epoch=step // 5)
        rows = mgr.history()
    got = [(r["step"], r["epoch"], r["reason"], r["kind"], r["state"]) for r in rows]
    # Step 5 crosses into epoch 1; removed ones keep the kind they had (demoted first).
    assert got == [(2, 0, "periodic", "weights", "removed"),
                   (4, 0, "periodic", "weights", "removed"), (5, 1, "epoch", "weights", "removed"),
                   (6, 1, "periodic", "weights", "demoted"),
                   (8, 1, "periodic", "weights", "demoted"), (10, 2, "periodic", "full", "kept")]
    assert rows[-1]["metrics"] == {"loss": 0.0} and rows[-1]["written_bytes"] > 0
    assert rows[-1]["referenced_bytes"] == 0 and rows[-1]["stall_s"] >= 0
    assert cli.main(["ls", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["state"]) for r in doc["history"]] == [(r[0], r[4]) for r in got]
    listed = {r["step"]: (r["epoch"], r["kind"]) for r in doc["checkpoints"] if r["step"]}
    assert listed == {6: (1, "weights"), 8: (1, "weights"), 10: (2, "full")}
    assert doc["monitor"] == "loss" and doc["mode_source"] == "manager" and doc["best"] == 10


def test_a_restore_after_an_unclean_end_counts_one_failure(tmp_path):
    mgr = _mgr(tmp_path, save=EveryNSteps(1))
    mgr.maybe_save(1, _state(1))
    mgr._ranks.close()  # the process dies: no close(), its run never ends
    mgr._lease.release()
    for clean in (True, False):
        with _mgr(tmp_path) as mgr:
            assert mgr.restore(_state(0)) == 1
            assert mgr._schedule.facts.failures == 1  # the first run; a clean one adds none
            if not clean:
                with pytest.raises(RuntimeError):
                    with mgr:
                        raise RuntimeError("the training failed")
    with _mgr(tmp_path) as mgr:
        mgr.restore(_state(0))
        assert mgr._schedule.facts.failures == 2  # the run that raised
    doc = json.loads((tmp_path / ".manager-history.json").read_text())
    assert [r["failed"] for r in doc["runs"]] == [True, False, True, False]


def test_auto_interval_follows_young_daly_within_bounds():
    mtbf = interval.mtbf(0, 0.0, world_size=16384)
    assert mtbf == pytest.approx(1.8 * 3600)
    assert interval.mtbf(3, 9 * 3600.0, prior_s=3600.0) == pytest.approx(10 * 3600 / 4)
    rule = Auto(min_interval_s=60, max_interval_s=3600)
    facts = Facts(costs=[(20.0, 90.0)] * 3, world_size=16384)
    assert rule.interval(facts) == pytest.approx((2 * 20 * 1.8 * 3600) ** 0.5)
    assert rule.interval(Facts(costs=[(0.01, 300.0)], world_size=16384)) == 300.0  # >= durable
    assert rule.interval(Facts(costs=[(500.0, 1.0)], world_size=1)) == 3600.0  # the max
    # The interval with the least expected overhead, found by brute force, agrees.
    grid = [60 * 1.02 ** i for i in range(300)]
    best = min(grid, key=lambda t: interval.overhead(t, 20.0, 90.0, mtbf))
    assert interval.overhead(rule.interval(facts), 20.0, 90.0, mtbf) <= \
        interval.overhead(best, 20.0, 90.0, mtbf) * 1.001


def test_auto_saves_when_its_interval_has_passed(tmp_path):
    now = [0.0]
    rule = Auto(min_interval_s=10, max_interval_s=100, mtbf_prior_s=400.0)
    with _mgr(tmp_path, save=rule, clock=lambda: now[0]) as mgr:
        saved = []
        for step in range(1, 40):
            now[0] += 5.0
            if mgr.maybe_save(step, _state(step)):
                saved.append(step)
    # The first save is due at the minimum (no cost measured yet); then the measured stall is
    # tiny, so the interval stays at the minimum: every 10 s, i.e. every other step.
    assert saved[:3] == [2, 4, 6]
