"""A failing or dying rank: every surviving rank raises within the timeout, nothing commits."""

import os
import time

import pytest

import shardckpt
from shardckpt.testing import Faults, flip_byte, run_with_ranks
from tests.distributed.test_reshard import sharded_state

TIMEOUT = 8.0  # short, so dead ranks are found quickly; long enough for a loaded machine


class Exploding:
    def state_dict(self):
        raise RuntimeError("boom while building the state dict")

    def load_state_dict(self, sd):
        pass


def _save_failing(rank, world, path, how):
    state = sharded_state(world)
    if rank == 1 and how == "raise":
        state["bad"] = Exploding()
    if rank == (0 if how == "coordinator dies" else 1) and how.endswith("dies"):
        Faults(pytest.MonkeyPatch()).die_in_write()
    t0 = time.monotonic()
    with pytest.raises(shardckpt.RankFailureError) as info:
        shardckpt.save(state, path, timeout=TIMEOUT, chunk_bytes=64)
    return {"seconds": time.monotonic() - t0, "failed": sorted(info.value.failures),
            "text": str(info.value)}


@pytest.mark.parametrize("how", ["raise", "rank dies", "coordinator dies"])
def test_failed_rank_fails_every_rank_and_commits_nothing(tmp_path, how):
    path = str(tmp_path / "ckpt")
    results = run_with_ranks(3, _save_failing, path, how, expect_errors=True, timeout=90)
    dead = 0 if how == "coordinator dies" else 1
    for r in results:
        if how.endswith("dies") and r.rank == dead:
            assert r.exitcode == 3  # it really died
            continue
        assert r.error is None, r.traceback
        assert dead in r.value["failed"], r.value
        assert r.value["seconds"] < 2 * TIMEOUT + 35
        if how == "raise":
            assert "boom" in r.value["text"]
    assert not os.path.exists(path)
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.load_full(path)
    if how != "coordinator dies":  # the coordinator cleans up; a dead one cannot
        assert os.listdir(tmp_path) == []


def _load_corrupt(rank, world, path):
    state = sharded_state(world, zeros=True)
    try:
        shardckpt.load(state, path, per_rank="rank0", timeout=TIMEOUT)
    except shardckpt.CorruptCheckpointError as exc:
        return ("corrupt", exc.file, exc.tensor)
    except shardckpt.RankFailureError as exc:
        return ("rank failure", sorted(exc.failures))
    return ("ok",)


def _save_plain(rank, world, path):
    shardckpt.save(sharded_state(world), path, codec="raw", chunk_bytes=64, timeout=30)


def test_corrupt_chunk_during_resharding_load_is_named(tmp_path):
    path = str(tmp_path / "ckpt")
    run_with_ranks(2, _save_plain, path)
    m = shardckpt.format.opening.open_manifest(*shardckpt.storage.open_checkpoint(path))
    chunks = m.tensors["model/s0"].chunks
    row = next(r for r in chunks if m.files[r[0]].rank == 1)  # a chunk rank 1 wrote
    bad_file = m.files[row[0]].path
    flip_byte(os.path.join(path, bad_file), int(row[1]) + 3)
    results = [r.value for r in run_with_ranks(3, _load_corrupt, path)]
    corrupt = [v for v in results if v[0] == "corrupt"]
    assert corrupt and all(v[1:] == (bad_file, "model/s0") for v in corrupt)
    assert all(v[0] in ("corrupt", "rank failure") for v in results)
    assert any(v[0] == "rank failure" for v in results) or len(corrupt) == 3
