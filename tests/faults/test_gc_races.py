"""Issue 25 case 12: ``gc`` (``collect_garbage``, behind ``shardckpt gc`` and ``cleanup``) runs
while a manager saves and applies retention. A checkpoint removed while gc reads it must not stop
gc with an untyped error, nor make it delete what a remaining checkpoint needs; and the
manager's ``latest`` write survives gc removing its temporary before the rename."""

import threading

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import shardckpt
from shardckpt.format import retire
from shardckpt.manage.layout import collect_garbage
from shardckpt.manage.manager import CheckpointManager, step_name
from shardckpt.storage import open_storage
from shardckpt.storage.wrapper import StorageWrapper


class RemovesDuringCall(StorageWrapper):
    """Plays retention in another process: at the ``at``-th request, ``victim`` is removed
    (retire.remove_checkpoint on the plain storage) before the request runs."""

    def __init__(self, inner, at: int, victim: str):
        super().__init__(inner)
        self.at, self.victim, self.calls = at, victim, 0

    def _call(self, op, path, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            retire.remove_checkpoint(self.inner, self.victim)
        return super()._call(op, path, *args, **kwargs)


def _chain(root, steps=4):
    """Incremental checkpoints step 1..steps, each referencing the one before; step 1 retired
    (step 2 still references it), as retention leaves them."""
    with CheckpointManager(root, async_save=False, handle_preemption=False,
                           incremental=True) as mgr:
        for step in range(1, steps + 1):
            mgr.save(step, {"w": torch.arange(512.0),  # stored once, by step 1
                            "b": torch.full((64,), 1.0 * step)})
    retire.remove_checkpoint(open_storage(root), step_name(1))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(at=st.integers(1, 60), victim=st.sampled_from([2, 3]))
def test_gc_survives_a_checkpoint_removed_while_it_reads(tmp_path_factory, at, victim):
    root = tmp_path_factory.mktemp("root")
    _chain(root)
    storage = RemovesDuringCall(open_storage(root), at, step_name(victim))
    removed, kept = collect_garbage(storage, older_than=0)  # no untyped error
    plain = open_storage(root)
    for step in (2, 3, 4):  # whatever is still committed loads, bit for bit
        if plain.exists(f"{step_name(step)}/manifest.json"):
            shardckpt.verify(root / step_name(step))
            got = shardckpt.load_full(root / step_name(step))
            assert torch.equal(got["b"], torch.full((64,), 1.0 * step))


class CollectsLatestTmp(StorageWrapper):
    """gc with ``--older-than 0`` removing the manager's fresh ``.latest.tmp-*`` right after it
    was written (``times`` times)."""

    def __init__(self, inner, times: int):
        super().__init__(inner)
        self.times = times

    def write(self, path, data, durable=True, exclusive=True):
        super().write(path, data, durable, exclusive)
        if path.startswith(".latest.tmp-") and self.times > 0:
            self.times -= 1
            self.inner.delete(path)


def test_latest_write_survives_gc_removing_its_temporary(tmp_path):
    with CheckpointManager(tmp_path, async_save=False, handle_preemption=False) as mgr:
        mgr._storage = CollectsLatestTmp(mgr._storage, times=2)
        mgr.save(1, {"w": torch.ones(4)})  # no FileNotFoundError: written again
        assert (tmp_path / "latest").read_text().strip() == step_name(1)
        mgr._storage.times = 10  # gc wins every time: the committed save is not failed
        mgr.save(2, {"w": torch.ones(4)})
        assert mgr.steps() == [1, 2]


def test_gc_in_a_loop_beside_incremental_saves_with_retention(tmp_path):
    """The real race, in threads: gc over and over while a manager saves incrementally with
    keep_last=2, retiring and sweeping. Neither side raises; what stays committed loads.
    (``--older-than 5s`` spares the save in flight; 0 would delete it by request.)"""
    root = tmp_path / "root"
    errors, stop = [], threading.Event()
    mgr = CheckpointManager(root, async_save=False, handle_preemption=False, incremental=True,
                            keep_last=2)

    def gc_loop():
        storage = open_storage(root)
        while not stop.is_set():
            try:
                collect_garbage(storage, older_than=5)
            except Exception as exc:  # noqa: BLE001 - any escape is the failure
                errors.append(exc)
    worker = threading.Thread(target=gc_loop)
    worker.start()
    try:
        for step in range(1, 16):
            mgr.save(step, {"w": torch.arange(2048.0) + (step // 3),
                            "b": torch.full((64,), 1.0 * step)})
    finally:
        stop.set()
        worker.join()
        mgr.close()
    assert not errors, errors[:3]
    for step in mgr.steps():
        got = shardckpt.load_full(root / step_name(step))
        assert torch.equal(got["b"], torch.full((64,), 1.0 * step))


class DeleteFails(StorageWrapper):
    """A store whose deletes silently leave things behind (LocalStorage's rmtree ignores
    errors: a read-only mount, another user's files)."""

    def delete(self, path):
        pass


def test_gc_never_reports_removed_what_is_still_there(tmp_path):
    import os
    import time
    with CheckpointManager(tmp_path, async_save=False, handle_preemption=False) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    leftover = tmp_path / ".step-00000002.tmp-ab12"
    (leftover / "data").mkdir(parents=True)
    then = time.time() - 7200
    for p in (leftover / "data", leftover):
        os.utime(p, (then, then))
    removed, kept = collect_garbage(DeleteFails(open_storage(tmp_path)), older_than=0)
    assert removed == [] and [r["name"] for r in kept] == [leftover.name]
    assert "could not be removed" in kept[0]["reason"]
