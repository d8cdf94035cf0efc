"""Retries, permanent failures and interrupted saves on object storage, driven by the faulty
storage wrapper (and a process killed before its commit)."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import shardckpt
from shardckpt.format import root as rootdir
from shardckpt.storage import open_storage
from shardckpt.storage.retry import call, is_transient
from shardckpt.testing import run_with_ranks
from shardckpt.testing.faulty_storage import FaultPlan, inject
from tests.helpers import assert_same

STATE = {"w": torch.arange(6 << 20, dtype=torch.float32).reshape(-1, 1024), "step": 3}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setenv("SHARDCKPT_STORAGE_BACKOFF", "0.001")
    monkeypatch.setenv("SHARDCKPT_STORAGE_RETRIES", "3")
    monkeypatch.setenv("SHARDCKPT_UPLOAD_PART_BYTES", str(5 << 20))  # several parts per file


def test_transient_classification():
    assert is_transient(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert is_transient(TimeoutError("slow"))
    assert is_transient(OSError(errno.EBUSY, "SlowDown: reduce your request rate"))
    assert is_transient(OSError(errno.EIO, "An error occurred (503)"))
    assert not is_transient(PermissionError(errno.EACCES, "denied"))
    assert not is_transient(OSError(errno.EIO, "read 5000 bytes"))
    assert not is_transient(ValueError("bad"))


def test_retry_is_bounded():
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionResetError(errno.ECONNRESET, "reset")
    with pytest.raises(shardckpt.StorageError, match="after 4 attempts.*reset"):
        call(flaky, "read s3://b/k")
    assert len(calls) == 4


@pytest.mark.parametrize("op", ["upload_part", "write", "read", "size", "exists"])
def test_transient_faults_are_retried(s3_url, op):
    url, opts = s3_url
    # The manifest is the one whole-object write of this save (data goes up in parts).
    with inject(FaultPlan(fail_at=1 if op == "write" else 2, times=2, ops=(op,))) as plan:
        shardckpt.save(STATE, f"{url}/ck", storage_options=opts, chunk_bytes=1 << 20)
        out = shardckpt.load_full(f"{url}/ck", storage_options=opts)
    assert plan.failures == 2
    assert_same(out, STATE)


def test_permanent_fault_names_the_object_and_commits_nothing(s3_url):
    url, opts = s3_url
    shardckpt.save(STATE, f"{url}/step-1", storage_options=opts)
    with inject(FaultPlan(fail_at=2, kind="permanent", ops=("upload_part",))):
        with pytest.raises(shardckpt.StorageError, match=r"upload_part s3://.*/step-2/data/rank"):
            shardckpt.save(STATE, f"{url}/step-2", storage_options=opts, chunk_bytes=1 << 20)
    storage = open_storage(url, opts)
    assert rootdir.list_checkpoints(storage) == ["step-1"]
    assert not storage.exists("step-2/manifest.json")
    with pytest.raises(shardckpt.CheckpointError):
        shardckpt.load_full(f"{url}/step-2", storage_options=opts)
    assert_same(shardckpt.load_full(f"{url}/step-1", storage_options=opts), STATE)


def test_retries_exhausted(memory_url):
    with inject(FaultPlan(fail_at=1, times=100, ops=("write",), match="manifest")):
        with pytest.raises(shardckpt.StorageError, match="after 4 attempts"):
            shardckpt.save(STATE, f"{memory_url}/ck")
    assert open_storage(memory_url).list("") == []  # the failed save's data was removed


def test_latency(memory_url):
    with inject(FaultPlan(latency=0.002)) as plan:
        shardckpt.save(STATE, f"{memory_url}/ck")
        assert_same(shardckpt.load_full(f"{memory_url}/ck"), STATE)
    assert len(plan.log) > 5 and plan.failures == 0


def _die_before_commit(rank, world, url, opts):
    from shardckpt.save.commit import MarkerCommit
    MarkerCommit.commit = lambda self, manifest: os._exit(9)  # a crash: no cleanup runs
    shardckpt.save(STATE, f"{url}/step-2", storage_options=opts)


def test_interrupted_save_leaves_recognisable_leftovers(s3_url):
    url, opts = s3_url
    shardckpt.save(STATE, f"{url}/step-1", storage_options=opts)
    [res] = run_with_ranks(1, _die_before_commit, url, opts, expect_errors=True, timeout=120)
    assert res.exitcode == 9
    storage = open_storage(url, opts)
    assert rootdir.list_checkpoints(storage, validate=True) == ["step-1"]
    assert rootdir.leftovers(storage) == ["step-2"]
    with pytest.raises(shardckpt.IncompleteCheckpointError):
        shardckpt.load_full(f"{url}/step-2", storage_options=opts)
    assert_same(shardckpt.load_full(f"{url}/step-1", storage_options=opts), STATE)
    assert rootdir.remove_leftovers(storage) == ["step-2"]
    assert rootdir.leftovers(storage) == [] and storage.list("") == ["step-1"]
    shardckpt.save(STATE, f"{url}/step-2", storage_options=opts)  # the name is usable again
