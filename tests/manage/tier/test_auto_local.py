"""``Auto`` on the local tier weighs the local tier's durable time: each committed background
save reports its stall and its seconds until committed (replicas included), the local rule's
costs hold them, and a slower local write makes the chosen interval longer."""

import warnings

import torch

import shardckpt
from shardckpt.manage import interval as interval_mod
from shardckpt.policy import Auto
from shardckpt.testing import run_with_ranks

RULE = {"min_interval_s": 0.01, "max_interval_s": 60.0, "mtbf_prior_s": 1.0}


def state(step: int) -> dict:
    return {"w": torch.arange(1000, dtype=torch.float32) + step, "step": step}


def local_costs(root, local, steps: int = 2, **kw) -> tuple[list, float]:
    """Run ``steps`` local saves under ``Auto`` (each waited for, then reported at the next
    call); the local rule's costs and the interval it chose from them."""
    with shardckpt.CheckpointManager(root, local_dir=local, every_n_steps=None,
                                     local_save=Auto(**RULE), async_save=False,
                                     handle_preemption=False, local_on_busy="wait", **kw) as m:
        for step in range(1, steps + 1):
            m._local.facts.last_save = float("-inf")  # due now: the test times each save
            m.maybe_save(step, state(step))
            assert m._tier.wait() is True
        m.maybe_save(steps + 1, state(steps + 1))  # takes the last save's report
        return list(m._local.facts.costs), m._local.save.interval(m._local.facts)


def test_completions_report_each_committed_local_save(tmp_path):
    with shardckpt.CheckpointManager(tmp_path / "d", local_dir=tmp_path / "l",
                                     every_n_steps=None, local_every_n_steps=1,
                                     async_save=False, handle_preemption=False,
                                     local_on_busy="wait") as m:
        m._local.completions = None  # the test takes the reports itself
        m.maybe_save(1, state(1))
        m._tier.wait()
        (done,) = m._tier.completions()
        assert done["step"] == 1 and set(done) == {"step", "stall_s", "seconds"}
        assert 0.0 <= done["stall_s"] <= done["seconds"]
        assert m._tier.completions() == []  # each report is handed out once


def test_the_local_auto_interval_grows_with_the_local_durable_time(tmp_path, faults):
    fast, fast_interval = local_costs(tmp_path / "d1", tmp_path / "l1")
    assert len(fast) == 2
    # A slow local disk: every data file write takes longer than the fast run's interval.
    slow_s = min(3.0, max(0.3, 1.5 * fast_interval))
    faults.slow_writes(slow_s)
    slow, slow_interval = local_costs(tmp_path / "d2", tmp_path / "l2")
    assert len(slow) == 2
    for stall, durable in slow:
        assert durable >= slow_s  # the background write's time is the tier's durable time
        assert stall < slow_s  # ... and never blocked the training loop
    stall, durable = interval_mod.typical_costs(slow)
    assert slow_interval >= durable >= slow_s > fast_interval


def _rank_local_auto(rank, world, root, local, slow_s):
    import os
    os.environ.update(RANK=str(rank), LOCAL_WORLD_SIZE="1", SHARDCKPT_DIST_TIMEOUT="20")
    os.environ.pop("GROUP_RANK", None)
    if slow_s:
        from shardckpt import codecs
        import time
        real = codecs.backend.write_file

        def slow(*args):  # the fault hook of shardckpt.testing.Faults.slow_writes
            time.sleep(slow_s)
            return real(*args)
        codecs.backend.write_file = slow
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with shardckpt.CheckpointManager(root, local_dir=f"{local}/node-{{node}}",
                                         every_n_steps=None, local_save=Auto(**RULE),
                                         async_save=False, handle_preemption=False,
                                         local_on_busy="wait", replicas=1) as m:
            for step in range(1, 9):  # with ranks a due flag acts one call later: every other
                m._local.facts.last_save = float("-inf")  # call saves
                w = distribute_tensor(torch.arange(64.0).reshape(8, 8) + step, mesh, [Shard(0)])
                m.maybe_save(step, {"w": w, "step": step})
                m._tier.wait()
            return m._tier.replicas, list(m._local.facts.costs), \
                m._local.save.interval(m._local.facts)


def test_two_ranks_with_replicas_report_the_local_durable_time(tmp_path):
    """2 nodes x 1 rank, one replica each: the reported time covers the replica transfer."""
    results = run_with_ranks(2, _rank_local_auto, str(tmp_path / "d"), str(tmp_path / "l"), 0.3)
    for replicas, costs, chosen in (r.value for r in results):
        assert replicas == 1 and len(costs) >= 2
        durable = interval_mod.typical_costs(costs)[1]
        assert durable >= 0.3 and chosen >= durable
