"""The tracker callbacks' shared worker (shardckpt/integrations/trackers.py), with a tracker of
our own that keeps its registrations in memory: the callback never waits for the tracker,
failures are retried in order, records come from the manifest."""

import logging
import threading
import time

import torch

import shardckpt
from shardckpt.integrations.trackers import TrackerCallback, read_record

STATE = {"model": {"w": torch.ones(256, 64)}}


class Ledger(TrackerCallback):
    """A tracker in memory; ``gate`` holds every registration, ``fail`` refuses the next N."""

    def __init__(self, fail: int = 0, **options):
        super().__init__(**options)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail
        self.log: list[tuple] = []

    def _call(self, *entry):
        self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("tracker down")
        self.log.append(entry)

    def _commit(self, record):
        self._call("commit", record.step, tuple(record.aliases))

    def _remove(self, record):
        self._call("remove", record.step)

    def _demote(self, record):
        self._call("demote", record.step)

    def _drop_alias(self, alias, old):
        self._call("drop", alias, old.step)

    def _move_alias(self, alias, old, new):
        self._call("move", alias, old and old.step, new and new.step)


def test_a_blocked_tracker_costs_the_save_only_a_queued_event(tmp_path):
    tracker = Ledger()
    tracker.gate.clear()  # the tracker hangs
    calls = []

    def timed(event):
        t0 = time.perf_counter()
        tracker(event)
        calls.append(time.perf_counter() - t0)
    with shardckpt.CheckpointManager(tmp_path / "ck", keep_last=1, on_event=timed,
                                     async_save=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, STATE)
    assert mgr.steps() == [3]
    assert max(calls) < 0.05, calls  # every event, committed or removed, only queued
    assert not tracker.flush(0.2) and tracker.log == []
    tracker.gate.set()
    assert tracker.flush(10)
    # in order; a step gone before the tracker got to it is not registered, or is marked
    # removed right after: nothing registered points at a folder that is gone
    committed = [e[1] for e in tracker.log if e[0] == "commit"]
    removed = [e[1] for e in tracker.log if e[0] == "remove"]
    assert committed[-1] == 3 and set(committed) - set(removed) == {3}
    assert tracker.aliases == {"latest": 3} and list(tracker.records) == [3]
    assert tracker.close(5)


def test_failures_are_retried_in_order_and_logged(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="shardckpt")
    tracker = Ledger(fail=3, retry_max_seconds=0.1)
    with shardckpt.CheckpointManager(tmp_path / "ck", keep_last=2, monitor="acc", mode="max",
                                     on_event=tracker, async_save=False) as mgr:
        for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7)]:
            mgr.save(step, STATE, metrics={"acc": acc})
            assert tracker.flush(10)
        mgr.save(4, STATE, metrics={"acc": 0.1})  # removes 2, the best
        assert tracker.flush(10)
    assert tracker.failures == 3 and caplog.text.count("retrying in") == 3
    assert tracker.log == [
        ("commit", 1, ("latest", "best")),
        ("commit", 2, ("latest", "best")), ("drop", "latest", 1), ("drop", "best", 1),
        ("commit", 3, ("latest",)), ("drop", "latest", 2), ("remove", 1),
        ("commit", 4, ("latest",)), ("drop", "latest", 3), ("remove", 2),
        ("move", "best", None, 3)]
    assert tracker.aliases == {"latest": 4, "best": 3} and sorted(tracker.records) == [3, 4]
    assert tracker.close(5)


def test_the_record_comes_from_the_manifest(tmp_path):
    with shardckpt.CheckpointManager(tmp_path / "ck", incremental=True,
                                     async_save=False) as mgr:
        mgr.save(1, STATE, metrics={"loss": 2.0})
        mgr.save(2, STATE, metrics={"loss": 1.0})
    full, incr = read_record(mgr.path(1), 1), read_record(mgr.path(2), 2)
    assert (full.kind, incr.kind) == ("full", "incremental")
    assert full.bytes_written > 0 and full.bytes_referenced == 0
    assert incr.bytes_referenced == full.bytes_written and incr.bytes_written == 0
    assert incr.metrics == {"loss": 1.0} and incr.reason == "manual" and incr.step == 2
    raw = (tmp_path / "ck" / "step-00000002" / "manifest.json").read_bytes()
    assert raw.endswith(b',"manifest_crc32c":%d}' % incr.manifest_crc32c)


def _register_on_two_ranks(rank, world, root):
    tracker = Ledger()
    with shardckpt.CheckpointManager(root, keep_last=1, on_event=tracker,
                                     async_save=False) as mgr:
        for step in (1, 2):
            mgr.save(step, STATE)
    assert tracker.close(10), tracker.last_error
    return [e[:2] for e in tracker.log]


def test_two_ranks_register_once(tmp_path):
    from shardckpt.testing import run_with_ranks
    logs = [r.value for r in run_with_ranks(2, _register_on_two_ranks, str(tmp_path / "ck"))]
    assert logs[1] == []  # every rank gets the events; rank 0 alone registers
    assert [e for e in logs[0] if e[0] == "commit"][-1] == ("commit", 2)
    assert ("remove", 1) in logs[0] or ("commit", 1) not in logs[0]


def test_an_event_the_tracker_cannot_take_is_skipped_not_retried(tmp_path, caplog):
    from shardckpt.errors import TrackerError

    class Refuses(Ledger):
        def _commit(self, record):
            if record.step == 1:
                raise TrackerError("copy=True of an object store")
            super()._commit(record)
    tracker = Refuses()
    with shardckpt.CheckpointManager(tmp_path / "ck", on_event=tracker,
                                     async_save=False) as mgr:
        mgr.save(1, STATE)
        mgr.save(2, STATE)
    assert tracker.close(10) and tracker.failures == 1
    assert isinstance(tracker.last_error, TrackerError) and "skips save_committed" in caplog.text
    assert [e for e in tracker.log if e[0] == "commit"] == [("commit", 2, ("latest",))]
    assert list(tracker.records) == [2]
