"""kill -9 at random instants, of a saving process and of one rank of two: every committed
checkpoint loads bit-exactly, everything else is refused with a CheckpointError or invisible.

A sampled number of trials runs here (SHARDCKPT_SLOW=1: the soak counts); each trial's
outcome counts come from ``shardckpt.testing.crash.judge``. ``scripts/soak_faults.py`` runs the
same trials by the hundred.
"""

import random
from collections import Counter

import pytest

from shardckpt.testing import crash
from tests.helpers import trials

TIMEOUT = 6.0  # a dead rank is noticed after this long; tiny saves finish well inside it


def test_kill_9_of_a_process_saving_in_a_loop(tmp_path):
    rng, total, interrupted = random.Random(20261127), Counter(), 0
    n = trials(20, 200)
    for i in range(n):  # every other kill lands at a random instant, the rest inside a save
        out = crash.kill_single(str(tmp_path / f"trial-{i}"), seed=i, rng=rng, inside=i % 2 == 1)
        interrupted += bool(out["detected"] or out["inflight-ok"])
        total += out
    assert total["lost"] == 0 and total["escaped"] == 0, total
    # The trials did commit (not killed at birth). How many saves fit before the kill depends on
    # the machine's load, so this asks for one per trial on average, not a rate.
    assert total["committed-ok"] >= n, total
    # And kills did land inside saves. A blind kill does so in about half the trials on a quiet
    # machine and in a fifth under CI load (a save is a few ms of a ~20 ms loop); a kill that
    # waits to see a save in flight nearly always does.
    assert interrupted >= n // 3, (interrupted, total)


@pytest.mark.parametrize("victim", [1, 0], ids=["rank 1 dies", "the coordinator dies"])
def test_kill_9_of_one_rank_of_two(tmp_path, victim):
    rng, total = random.Random(victim), Counter()
    for i in range(trials(2, 50)):
        out, report = crash.kill_rank(str(tmp_path / f"trial-{i}"), seed=i, rng=rng,
                                      timeout=TIMEOUT, victim=victim)
        total += out
        assert report["survivor_error"] is None and report["failed"] == [victim], report
        # Within the timeout (twice it plus 30 s when the coordinator is the one that died).
        limit = TIMEOUT + 10 if victim else 2 * TIMEOUT + 30
        assert report["seconds"] is not None and report["seconds"] < limit, report
    assert total["lost"] == 0 and total["escaped"] == 0, total
    assert total["committed-ok"] > 0, total
