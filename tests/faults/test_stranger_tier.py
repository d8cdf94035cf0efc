"""Issue 25, case 9: a local tier left by another job is never restored, and never used to
"repair" this job's good copy.

Each local manifest records its job (the durable root and the job id kept in it); a restore
uses only copies of its own job. Before, any committed step was a candidate and the lowest
rank's manifest won: a fresh job over job 1's leftover folders restored job 1's state, and with
node 0 holding job 1's step 3 and node 1 holding job 2's, node 1's good copy was overwritten
with job 1's bytes.
"""

import os
import shutil
import warnings

import pytest
import torch

import shardckpt
from shardckpt.manage.tier.local import LocalTier
from shardckpt.testing import run_with_ranks


def _state(step: int, job: int) -> dict:
    return {"w": torch.arange(2000, dtype=torch.float32) + step + 1000 * job, "step": step}


def _manager(root, local, **kw):
    kw = {"every_n_steps": None, "local_every_n_steps": 1, "async_save": False,
          "handle_preemption": False, "local_on_busy": "wait", "local_keep": 2, **kw}
    return shardckpt.CheckpointManager(root, local_dir=local, **kw)


def test_a_fresh_job_ignores_another_jobs_local_tier(tmp_path):
    local = tmp_path / "local"
    with _manager(tmp_path / "job1", local) as m:
        for step in range(1, 6):
            m.maybe_save(step, _state(step, 1))
    target = _state(0, 2)
    with pytest.warns(UserWarning, match="to another job"):
        with _manager(tmp_path / "job2", local) as m:
            assert m.restore(target) is None  # a fresh start, not job 1's step 5
    assert torch.equal(target["w"], _state(0, 2)["w"])
    with _manager(tmp_path / "job1", local) as m:  # job 1 itself still restores it
        target = _state(0, 1)
        assert m.restore(target) == 5
        assert torch.equal(target["w"], _state(5, 1)["w"])


def test_a_new_durable_root_at_the_same_path_is_another_job(tmp_path):
    """The job id lives in the durable root: a root wiped and started again is a new job."""
    local, root = tmp_path / "local", tmp_path / "durable"
    with _manager(root, local) as m:
        m.maybe_save(3, _state(3, 1))
    shutil.rmtree(root)
    with pytest.warns(UserWarning, match="to another job"):
        with _manager(root, local) as m:
            assert m.restore(_state(0, 2)) is None


def test_a_local_checkpoint_without_a_job_is_refused_clearly(tmp_path):
    """Saved by a tier bound to no job (an older shardckpt wrote none): ignored, said why."""
    local = tmp_path / "local"
    tier = LocalTier(local)
    tier.save(4, _state(4, 1), {})
    tier.close()
    shardckpt.verify(local / "step-00000004")  # still an ordinary checkpoint that loads
    with pytest.warns(UserWarning, match="no job recorded"):
        with _manager(tmp_path / "durable", local) as m:
            assert m.restore(_state(0, 2)) is None


def test_retention_counts_only_this_jobs_steps(tmp_path):
    """A stranger's newer step takes no place of this job's ``local_keep``, and goes."""
    local = tmp_path / "local"
    with _manager(tmp_path / "job1", local) as m:
        m.maybe_save(9, _state(9, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _manager(tmp_path / "job2", local) as m:
            m.maybe_save(1, _state(1, 2))
            m.maybe_save(2, _state(2, 2))
    assert sorted(os.listdir(local)) == ["step-00000001", "step-00000002"]


# ---------------------------------------------------------------- 2 nodes x 2 ranks

def _env(rank: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_WORLD_SIZE="2", SHARDCKPT_DIST_TIMEOUT="20")
    os.environ.pop("GROUP_RANK", None)


def _dist_state(world: int, step: int, job: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    return {"w": distribute_tensor(_full(step, job), mesh, [Shard(0)]), "step": step}


def _full(step: int, job: int) -> torch.Tensor:
    return torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8) + step + 1000 * job


def _save(rank, world, root, local, job):
    _env(rank)
    with _manager(root, f"{local}/node-{{node}}", local_keep=1) as m:
        for step in (1, 2, 3):
            m.maybe_save(step, _dist_state(world, step, job))


def _restore(rank, world, root, local):
    _env(rank)
    target = _dist_state(world, 0, 0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with _manager(root, f"{local}/node-{{node}}") as m:
            step = m.restore(target)
    return {"step": step, "w": target["w"].full_tensor(),
            "warnings": [str(w.message) for w in seen if "shardckpt" in str(w.message)]}


def test_a_strangers_copy_never_repairs_a_good_one(tmp_path):
    """Node 0 holds job 1's step 3, node 1 job 2's: job 2 restores its own step 3 on every
    rank, node 0's folder rebuilt from node 1's replicas; job 1's bytes are used nowhere."""
    roots = {job: str(tmp_path / f"durable{job}") for job in (1, 2)}
    locals_ = {job: str(tmp_path / f"local{job}") for job in (1, 2)}
    for job in (1, 2):
        run_with_ranks(4, _save, roots[job], locals_[job], job, timeout=120)
    mixed = str(tmp_path / "mixed")
    shutil.copytree(os.path.join(locals_[1], "node-0"), os.path.join(mixed, "node-0"))
    shutil.copytree(os.path.join(locals_[2], "node-1"), os.path.join(mixed, "node-1"))
    results = run_with_ranks(4, _restore, roots[2], mixed, timeout=120)
    for res in results:
        assert res.value["step"] == 3
        assert torch.equal(res.value["w"], _full(3, 2)), "restored another job's values"
    said = " ".join(results[0].value["warnings"])
    assert "to another job" in said, said
    for node in (0, 1):  # both folders now hold job 2's step 3, whole
        folder = os.path.join(mixed, f"node-{node}", "step-00000003")
        shardckpt.verify(folder)
        target = {"w": torch.zeros(64, 8), "step": -1}
        shardckpt.load(target, folder)
        assert torch.equal(target["w"], _full(3, 2))
