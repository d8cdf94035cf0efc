"""Distributed saves to S3 (moto): two gloo ranks save, one process loads (resharding); a rank
whose upload fails for good makes every rank raise and nothing is committed."""

from __future__ import annotations

import pytest

import shardckpt
from shardckpt.format import root as rootdir
from shardckpt.storage import open_storage
from shardckpt.testing import run_with_ranks
from tests.distributed.test_reshard import expected_full, sharded_state
from tests.helpers import assert_same

TIMEOUT = 30.0


def _save(rank, world, url, opts, fail_rank):
    state = sharded_state(world)
    if rank != fail_rank:
        return shardckpt.save(state, url, storage_options=opts, timeout=TIMEOUT,
                              chunk_bytes=256).stored_bytes
    from shardckpt.testing.faulty_storage import FaultPlan, inject
    with inject(FaultPlan(fail_at=1, kind="permanent", ops=("write", "upload_part"),
                          match="/data/")):
        shardckpt.save(state, url, storage_options=opts, timeout=TIMEOUT, chunk_bytes=256)


def _expect_failure(rank, world, url, opts, fail_rank):
    with pytest.raises(shardckpt.RankFailureError) as info:
        _save(rank, world, url, opts, fail_rank)
    return sorted(info.value.failures), str(info.value)


def test_world2_save_world1_load(s3_url):
    url, opts = s3_url
    run_with_ranks(2, _save, f"{url}/ck", opts, -1, timeout=120)
    full = shardckpt.load_full(f"{url}/ck", storage_options=opts)
    want = expected_full()
    for key in ("s0", "s1", "rep", "bf", "c3"):
        assert_same(full["model"][key], want[key])
    assert full["step"] == 42
    assert shardckpt.verify(f"{url}/ck", storage_options=opts).tensors >= 5
    [res] = run_with_ranks(1, _load, f"{url}/ck", opts, timeout=120)
    assert_same(res.value, want["s1"])


def _load(rank, world, url, opts):
    target = sharded_state(world, zeros=True)
    shardckpt.load(target, url, storage_options=opts, per_rank="rank0", timeout=TIMEOUT)
    return target["model"]["s1"].full_tensor()


def test_failed_upload_fails_every_rank(s3_url):
    url, opts = s3_url
    results = run_with_ranks(2, _expect_failure, f"{url}/ck", opts, 1, timeout=120)
    for r in results:
        failed, text = r.value
        assert 1 in failed and "injected permanent fault" in text, text
    storage = open_storage(url, opts)
    assert rootdir.list_checkpoints(storage) == []
    assert not storage.exists("ck/manifest.json")
