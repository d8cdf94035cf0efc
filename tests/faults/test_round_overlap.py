"""Issue 25, case 8: a durable save that starts while a background local save is inside its own
store round must not deadlock with it (2 nodes x 2 gloo ranks).

Both saves agree through the c10d store. When both of a process's rounds shared one store
client, a blocking wait of one thread held the client while the other thread's post queued
behind it; with the ranks split between the two threads, every rank waited forever (until the
timeout turned it into RankFailureError). The test forces exactly that interleaving with hooks
on ``Exchange._wait``: ranks 1-3 enter the local round's wait first, then start the durable
save; rank 0's local thread is held until rank 0 is waiting in the durable round.
"""

import os
import threading
import time
import warnings

import torch

import shardckpt
from shardckpt.testing import run_with_ranks

PER_NODE = 2


def _state(rank: int, step: int) -> dict:
    # The same on every rank: each rank writes some of the tensors (and replicates its file).
    return {f"w{i}": torch.full((4096,), float(step * 10 + i)) for i in range(4)} | \
        {"step": step}


def _overlap(rank, world, root, local):
    os.environ.update(RANK=str(rank), LOCAL_WORLD_SIZE=str(PER_NODE),
                      SHARDCKPT_DIST_TIMEOUT="8")
    os.environ.pop("GROUP_RANK", None)
    from shardckpt.dist import rounds as sdist
    real_wait = sdist.Exchange._wait
    local_waiting, durable_waiting = threading.Event(), threading.Event()
    armed = threading.Event()

    def wait(self, keys, deadline):
        in_local = threading.current_thread() is not threading.main_thread()
        if armed.is_set() and in_local and ".local-write/" in keys[0]:
            if rank == 0:  # held until rank 0's main thread waits in the durable round
                durable_waiting.wait(20)
                time.sleep(0.3)
            else:
                local_waiting.set()
        elif armed.is_set() and not in_local and ".plan/" in keys[0]:
            durable_waiting.set()
        return real_wait(self, keys, deadline)

    sdist.Exchange._wait = wait
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m = shardckpt.CheckpointManager(
            root, local_dir=f"{local}/node-{{node}}", every_n_steps=4, local_every_n_steps=2,
            async_save=False, handle_preemption=False, local_on_busy="skip", replicas=1)
        armed.set()
        m.maybe_save(2, _state(rank, 2))  # the local save: its rounds run in the background
        if rank != 0:  # the durable save starts while the local thread waits in its round
            local_waiting.wait(20)
            time.sleep(0.5)
        started = time.monotonic()
        m.maybe_save(4, _state(rank, 4))  # local step 4 skipped (2 in flight); durable 4
        took = time.monotonic() - started
        committed = m._tier.wait()
        m.close()
    return {"took": took, "local": committed, "durable": m.steps(),
            "warnings": [str(w.message) for w in seen if "shardckpt" in str(w.message)]}


def test_durable_save_during_a_local_round_does_not_block(tmp_path):
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    results = run_with_ranks(4, _overlap, root, local, timeout=150)
    for res in results:
        got = res.value
        assert got["durable"] == [4], got
        assert got["local"] is True, got["warnings"]
        assert got["took"] < 8, got  # far below the 8 s round timeout: nothing waited it out
        assert not [w for w in got["warnings"] if "failed" in w], got["warnings"]
    for node in (0, 1):
        shardckpt.verify(os.path.join(local, f"node-{node}", "step-00000002"))
    target = _state(0, 0)
    shardckpt.load(target, os.path.join(root, "step-00000004"))
    assert target["step"] == 4 and torch.equal(target["w3"], _state(0, 4)["w3"])
