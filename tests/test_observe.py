"""Observability: every save and load logs duration, stall, bytes and throughput; the manager's
on_event reports each event; a failing callback never breaks the training."""

import logging

import pytest
import torch

import shardckpt
from shardckpt import observe


def _state():
    return {"w": torch.zeros(256, 64), "step": 1}


def test_save_and_load_log_bytes_duration_and_throughput(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="shardckpt")
    shardckpt.save(_state(), tmp_path / "a", codec="zstd")
    shardckpt.async_save(_state(), tmp_path / "b").result()
    shardckpt.load(_state(), tmp_path / "a")
    lines = [r.getMessage() for r in caplog.records if r.name == "shardckpt"]
    saved = [m for m in lines if m.startswith("saved ")]
    assert len(saved) == 2 and all("stall" in m and "MiB/s" in m for m in saved)
    assert "raw 64.0 KiB" in saved[0] and "(1.00x)" not in saved[0]  # zeros compress
    loaded = [m for m in lines if m.startswith("loaded ")]
    assert len(loaded) == 1 and "MiB/s" in loaded[0]


def test_manager_reports_each_event(tmp_path):
    events = []
    with shardckpt.CheckpointManager(tmp_path, every_n_steps=2, keep_last=1,
                                     on_event=events.append) as mgr:
        for step in range(1, 7):
            mgr.maybe_save(step, _state(), metrics={"loss": 1.0 / step})
    kinds = [(e.kind, e.step) for e in events]
    assert kinds[:2] == [("save_started", 2), ("save_committed", 2)]
    assert ("removed", 2) in kinds and ("removed", 4) in kinds
    assert kinds[-2:] == [("save_committed", 6), ("removed", 4)]  # retention after commit
    committed = [e for e in events if e.kind == "save_committed"]
    assert all(e.raw_bytes == 256 * 64 * 4 and e.stored_bytes > 0 and e.seconds > 0
               and e.ratio == e.raw_bytes / e.stored_bytes for e in committed)
    assert committed[0].metrics == {"loss": 0.5}
    started = [e for e in events if e.kind == "save_started"]
    assert all(e.stall_seconds is not None and e.reason == "periodic" for e in started)
    events.clear()
    with shardckpt.CheckpointManager(tmp_path, on_event=events.append) as mgr:
        assert mgr.restore(_state()) == 6
    assert [(e.kind, e.step) for e in events] == [("restored", 6)]


def test_failed_save_event_and_a_broken_callback(tmp_path, caplog):
    events = []

    def broken(event):
        events.append(event)
        raise RuntimeError("callback bug")
    with shardckpt.CheckpointManager(tmp_path, async_save=False, on_event=broken) as mgr:
        mgr.save(1, _state())  # the callback's error is logged, the save stands
        assert mgr.steps() == [1]
    assert "on_event callback failed" in caplog.text
    events.clear()
    with shardckpt.CheckpointManager(tmp_path, on_event=events.append) as mgr:
        with pytest.raises(shardckpt.UnsupportedValueError):
            mgr.save(2, {"bad": object()})
            mgr.wait()
    assert all(e.kind != "save_committed" for e in events)


def test_event_ratio_without_bytes():
    assert observe.CheckpointEvent("save_started", 1, "p").ratio is None
