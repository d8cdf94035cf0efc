"""A rank that dies or hangs during a distributed save or load: the others raise
RankFailureError naming it within the configured timeout, and a save commits nothing.

tests/distributed/test_failures.py covers a rank that raises, or dies after writing, during a
save; this adds hangs (save and load) and deaths during a load.
"""

import os
import time

import pytest

import shardckpt
from shardckpt.testing import Faults, run_with_ranks
from tests.distributed.test_reshard import expected_full, sharded_state
from tests.helpers import assert_same

TIMEOUT = 6.0  # short, so the test is quick; tiny saves and loads finish well inside it
VICTIM = 1


def _victim(how: str) -> int:
    return 0 if how == "coordinator dies" else VICTIM


def _arm(rank, how, release):
    if rank != _victim(how):
        return
    faults = Faults(pytest.MonkeyPatch())
    {"hangs in save": lambda: faults.stall_in_write(release),
     "hangs in load": lambda: faults.stall_in_read(release),
     "dies in load": faults.die_in_read,
     "coordinator dies": faults.die_in_read}[how]()


def _run(rank, world, path, how, release):
    """Save or load with the fault armed on the victim; the survivors report how long they
    took to raise and whom they blamed, then release a hung victim."""
    _arm(rank, how, release)
    t0 = time.monotonic()
    try:
        if "save" in how:
            shardckpt.save(sharded_state(world), path, timeout=TIMEOUT, chunk_bytes=64)
        else:
            shardckpt.load(sharded_state(world, zeros=True), path, per_rank="rank0",
                           timeout=TIMEOUT)
        outcome = {"failed": None}
    except shardckpt.RankFailureError as exc:
        outcome = {"failed": sorted(exc.failures), "text": str(exc)}
    outcome["seconds"] = time.monotonic() - t0
    open(release, "w").close()  # a hung victim may go on now (it then fails too)
    return outcome


def _save_ok(rank, world, path):
    shardckpt.save(sharded_state(world), path, timeout=60)


@pytest.mark.parametrize("how", ["hangs in save", "hangs in load", "dies in load",
                                 "coordinator dies"])
def test_dead_or_hung_rank_makes_the_others_raise_in_time(tmp_path, how):
    path, release = str(tmp_path / "ckpt"), str(tmp_path / "release")
    if "load" in how or how == "coordinator dies":
        run_with_ranks(2, _save_ok, path)
    results = run_with_ranks(2, _run, path, how, release, expect_errors=True, timeout=120)
    victim = _victim(how)
    for r in results:
        if r.rank == victim:
            if "dies" in how:
                assert r.exitcode == 3  # it really died
            continue
        assert r.error is None, r.traceback
        assert r.value["failed"] == [victim], r.value
        assert "did not report" in r.value["text"] or "no answer" in r.value["text"] \
            or how == "coordinator dies", r.value
        limit = TIMEOUT + 10 if victim else 2 * TIMEOUT + 30
        assert r.value["seconds"] < limit, r.value
    if how == "hangs in save":
        assert not os.path.exists(path)  # nothing committed
        with pytest.raises(shardckpt.CheckpointNotFoundError):
            shardckpt.load_full(path)
    else:  # a failed load leaves the checkpoint as it was
        full = shardckpt.load_full(path)
        assert_same(expected_full()["s0"], full["model"]["s0"])
