"""async_save on several ranks: snapshot at the call, commit in the background, failures on all."""

import pytest

import shardckpt
from shardckpt.codecs import status
from shardckpt.testing import Faults, run_with_ranks
from tests.distributed.test_reshard import expected_full, sharded_state
from tests.helpers import assert_same


def _async_save(rank, world, path, fail_rank):
    state = sharded_state(world)
    if rank == fail_rank:
        Faults(pytest.MonkeyPatch()).write_status(status.NO_SPACE, "No space left", 28)
    handle = shardckpt.async_save(state, path, staging_budget_bytes=1 << 20, chunk_bytes=64,
                                  timeout=30)
    for t in state["model"].values():  # the training goes on
        (t.to_local() if hasattr(t, "to_local") else t).add_(1)
    try:
        handle.result(timeout=60)
        return "ok"
    except shardckpt.CheckpointError as exc:
        return type(exc).__name__


def test_async_save_on_two_ranks_holds_the_values_at_the_call(tmp_path):
    path = str(tmp_path / "ckpt")
    assert [r.value for r in run_with_ranks(2, _async_save, path, -1)] == ["ok", "ok"]
    loaded = shardckpt.load_full(path)
    assert_same(expected_full(), {k: loaded["model"][k] for k in expected_full()})


def test_background_failure_on_one_rank_fails_every_rank(tmp_path):
    path = str(tmp_path / "ckpt")
    results = [r.value for r in run_with_ranks(2, _async_save, path, 1)]
    assert results == ["RankFailureError", "RankFailureError"]
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.load_full(path)
