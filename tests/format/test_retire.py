"""Deleting checkpoints that newer incremental ones reference (retire.py, FORMAT.md 3.6.1):
every deletion order, a crash at every step of a deletion, and copies out of the root."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import shardckpt
from shardckpt.format import retire
from shardckpt.manage import layout
from shardckpt.format.root import list_checkpoints
from shardckpt.storage import LocalStorage
from shardckpt.ops.copy import copy_checkpoint
from tests.helpers import assert_same

NAMES = [f"step-0000000{i}" for i in range(4)]  # manager names: gc looks at those
C0, C1, C2, C3 = NAMES
CHUNK = 2048


def _build(root) -> dict:
    """Four checkpoints, each incremental on the previous; every step changes other tensors,
    so each references chunks written by several earlier ones. Returns name -> saved state."""
    gen = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(1500, generator=gen) for i in range(4)}
    saved, previous = {}, None
    for n, name in enumerate(NAMES):
        if n:
            state[f"t{n}"] = state[f"t{n}"] + 1  # t0 stays frozen throughout
        shardckpt.save(state, f"{root}/{name}", chunk_bytes=CHUNK, files_per_rank=1,
                       content_hashes=True, base=previous)
        saved[name] = {k: v.clone() for k, v in state.items()}
        previous = name
    return saved


def _all_load(root, saved, names):
    storage = LocalStorage(str(root))
    assert list_checkpoints(storage) == sorted(names)
    for name in names:
        assert_same(saved[name], shardckpt.load_full(f"{root}/{name}"))
        assert shardckpt.verify(f"{root}/{name}").ok


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(NAMES))
def test_every_deletion_order_keeps_the_rest_loadable_and_leaks_nothing(tmp_path, order):
    root = tmp_path / f"r{abs(hash(tuple(order)))}"
    root.mkdir()
    saved = _build(root)
    storage, kept = LocalStorage(str(root)), list(NAMES)
    for name in order:
        retire.remove_checkpoint(storage, name)
        retire.sweep_all(storage)
        kept.remove(name)
        _all_load(root, saved, kept)
    assert os.listdir(root) == []  # every retired folder went with its last user


class Crash(Exception):
    """Stands for the process dying at this point."""


class CrashingStorage(LocalStorage):
    """Local storage whose Nth mutation (delete or rename) raises before it happens."""

    def __init__(self, root, at):
        super().__init__(root)
        self.at, self.count = at, 0

    def _tick(self):
        self.count += 1
        if self.count == self.at:
            raise Crash

    def delete(self, path):
        self._tick()
        super().delete(path)

    def rename(self, src, dst, exchange=False):
        self._tick()
        super().rename(src, dst, exchange)


def test_a_crash_at_every_step_of_deletions_and_gc_keeps_checkpoints_loadable(tmp_path):
    order = (C1, C0, C2, C3)  # C1 first: C0 still holds files C1 does not reference
    at, finished = 1, False
    while not finished:  # crash at the 1st, 2nd, ... mutation until one run completes
        root = tmp_path / f"crash{at}"
        root.mkdir()
        saved = _build(root)
        storage = CrashingStorage(str(root), at)
        try:
            for name in order:
                retire.remove_checkpoint(storage, name)
                layout.collect_garbage(storage, older_than=0)
            finished = True
        except Crash:
            pass
        plain = LocalStorage(str(root))
        _all_load(root, saved, [n for n in NAMES if plain.exists(f"{n}/manifest.json")])
        for name in order:  # after the restart: finish the job
            if plain.exists(f"{name}/manifest.json"):
                retire.remove_checkpoint(plain, name)
                _all_load(root, saved, [n for n in NAMES if plain.exists(f"{n}/manifest.json")])
        layout.collect_garbage(plain, older_than=0)
        assert os.listdir(root) == []
        at += 1
    assert at > 8  # the loop really crashed inside many steps


def test_gc_keeps_retired_files_in_use_and_drops_unused_ones(tmp_path):
    saved = _build(tmp_path)
    storage = LocalStorage(str(tmp_path))
    retire.retire(storage, C0)  # retired, not swept: every file still there
    before = sorted(os.listdir(tmp_path / C0 / "data"))
    removed, kept = layout.collect_garbage(storage, older_than=3600)
    assert [r["name"] for r in kept] == [C0] and "referenced by" in kept[0]["reason"]
    assert os.listdir(tmp_path / C0 / "data") == before  # the one file is in use
    for name in (C1, C2, C3):
        retire.remove_checkpoint(storage, name)
    removed, _ = layout.collect_garbage(storage, older_than=3600)
    assert os.listdir(tmp_path) == [] and saved


def test_copy_out_of_the_root_materialises_references(tmp_path):
    root, out = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    out.mkdir()
    saved = _build(root)
    info = copy_checkpoint(f"{root}/{C3}", f"{out}/copy")
    assert info["materialised"] > 0
    m = shardckpt.format.opening.open_manifest(LocalStorage(str(out)), "copy")
    assert all(f.base is None for f in m.files)
    for name in NAMES:  # the copy needs nothing of the old root
        retire.remove_checkpoint(LocalStorage(str(root)), name)
    retire.sweep_all(LocalStorage(str(root)))
    assert os.listdir(root) == []
    assert_same(saved[C3], shardckpt.load_full(f"{out}/copy"))
    assert shardckpt.verify(f"{out}/copy").ok


def test_the_manager_keeps_what_newer_checkpoints_reference(tmp_path):
    gen = torch.Generator().manual_seed(1)
    state = {"frozen": torch.randn(4000, generator=gen), "live": torch.zeros(4000), "step": 0}
    with shardckpt.CheckpointManager(tmp_path, keep_last=2, incremental=True, async_save=True,
                                     handle_preemption=False,
                                     save_options={"chunk_bytes": CHUNK}) as mgr:
        for step in range(1, 7):
            state["live"] += 1
            state["step"] = step
            mgr.save(step, state)
            mgr.wait()
            assert len(mgr.steps()) == min(step, 2)
        assert mgr.restore(state) == 6
    entries = {e.name: e.kind for e in layout.entries(LocalStorage(str(tmp_path)))}
    assert entries == {"step-00000001": "retired", "step-00000005": "committed",
                       "step-00000006": "committed"}
    loaded = shardckpt.load_full(tmp_path / "step-00000005")
    assert torch.equal(loaded["live"], torch.full((4000,), 5.0))
    assert loaded["step"] == 5


def test_retention_on_an_object_store_retires_without_rename(memory_url):
    gen = torch.Generator().manual_seed(2)
    state = {"frozen": torch.randn(4000, generator=gen), "live": torch.zeros(4000)}
    with shardckpt.CheckpointManager(memory_url, keep_last=1, incremental=True,
                                     async_save=False, handle_preemption=False,
                                     save_options={"chunk_bytes": CHUNK}) as mgr:
        for step in range(1, 4):
            state["live"] += 1
            mgr.save(step, state)
        storage = mgr._storage
        assert not storage.atomic_rename and mgr.steps() == [3]
        kinds = {e.name: e.kind for e in layout.entries(storage)}
        assert kinds == {"step-00000001": "retired", "step-00000003": "committed"}
        assert_same(state, shardckpt.load_full(mgr.path(3)))
        assert shardckpt.verify(mgr.path(3), collect=True).ok
