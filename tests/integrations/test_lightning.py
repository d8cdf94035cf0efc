"""The Lightning CheckpointIO plugin with a real Trainer on CPU: ModelCheckpoint (monitor, mode,
save_top_k, every_n_train_steps, save_last) writes shardckpt checkpoints; a job killed mid-run
resumes with ckpt_path="last" to the same losses and weights as an uninterrupted run (1 process;
2 DDP processes with the async plugin; 2 FSDP2 processes through ShardCkptModelParallelStrategy,
whose sharded checkpoint then loads on 1 process); Lightning's SLURM requeue signal saves
through it."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import shardckpt

# find_spec, not importorskip: importing lightning here would cost the collection ~10 s.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="needs shardckpt[lightning]")
JOB = os.path.join(os.path.dirname(__file__), "lightning_job.py")


def _job(out, mode, devices, kill_at="-", async_io="0", env=None, timeout=400):
    return subprocess.run([sys.executable, JOB, str(out), mode, str(devices), str(kill_at),
                           async_io], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


def _losses(path):
    with open(path) as fh:
        return {d["step"]: d["loss"] for d in map(json.loads, fh)}


def _killed_then_resumed(tmp_path, devices, async_io, env=None):
    killed = _job(tmp_path, "run", devices, kill_at=8, async_io=async_io, env=env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert max(_losses(tmp_path / "losses-run.jsonl")) == 8  # died before step 9
    resumed = _job(tmp_path, "resume", devices, async_io=async_io)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint at" in resumed.stderr + resumed.stdout
    after, ref = _losses(tmp_path / "losses-resume.jsonl"), _losses(
        tmp_path / "ref" / "losses-run.jsonl")
    assert sorted(after) == [9, 10, 11, 12] and len(ref) == 12
    assert after == {s: ref[s] for s in after}  # bit-equal floats, step by step
    with open(tmp_path / "weights-resume.json") as fh, \
            open(tmp_path / "ref" / "weights-run.json") as gh:
        mine, theirs = json.load(fh), json.load(gh)
    assert mine["weights"] == theirs["weights"]
    return mine


def test_killed_fit_resumes_from_last_like_an_uninterrupted_run(tmp_path):
    bindir = tmp_path / "bin"  # stands in for SLURM's scontrol (the requeue command)
    bindir.mkdir()
    (bindir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n')
    (bindir / "scontrol").chmod(0o755)
    slurm = {"PATH": f"{bindir}:{os.environ['PATH']}", "JOB_REQUEUE_AT": "6",
             "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "job", "SLURM_JOB_ID": "42",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    final = _killed_then_resumed(tmp_path, 1, "0", env=slurm)
    # Lightning's SLURM requeue handler saved through the plugin, then requeued the job.
    assert (bindir / "calls").read_text().split() == ["requeue", "42"]
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    assert shardckpt.verify(hpc).ok
    assert shardckpt.load_full(hpc)["global_step"] == 6
    # Every file ModelCheckpoint kept is a committed shardckpt folder, loadable without pickle.
    assert "last.ckpt" in final["kept"]
    for name in final["kept"]:
        assert (tmp_path / "ckpt" / name / "manifest.json").is_file()
    from shardckpt.integrations.lightning import ShardCkptIO
    loaded = ShardCkptIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert loaded["global_step"] == 12 and "net.0.weight" in loaded["state_dict"]
    assert loaded["optimizer_states"][0]["state"][0]["step"].item() == 12


@pytest.mark.slow  # ~85 s on the shared 2 cores: three processes import Lightning twice
def test_ddp_two_processes_async_plugin_killed_and_resumed(tmp_path):
    final = _killed_then_resumed(tmp_path, 2, "1")
    assert "last.ckpt" in final["kept"]


@pytest.mark.slow  # ~110 s: two 2-process FSDP2 jobs and a 1-process load
def test_fsdp2_sharded_checkpoints_resume_and_reshard(tmp_path):
    final = _killed_then_resumed(tmp_path, 2, "fsdp2")
    from shardckpt.format.opening import open_for_read
    m, _ = open_for_read(tmp_path / "ckpt" / "last.ckpt")
    assert m.world_size == 2 and all(len(e.boxes) == 2 for k, e in m.tensors.items()
                                     if k.startswith("state_dict/"))  # sharded, not gathered
    resharded = _job(tmp_path, "reshard", 1, async_io="fsdp2")  # 2-rank checkpoint, 1 rank
    assert resharded.returncode == 0, resharded.stderr[-3000:]
    with open(tmp_path / "weights-reshard.json") as fh:
        assert json.load(fh)["weights"] == final["weights"]


def test_remove_checkpoint_and_async_flavour(tmp_path):
    import torch
    from shardckpt.integrations.lightning import AsyncShardCkptIO
    io = AsyncShardCkptIO()
    state = {"state_dict": {"w": torch.arange(6.0)}, "global_step": 3, "epoch": 0}
    io.save_checkpoint(state, tmp_path / "a.ckpt")
    state["state_dict"]["w"].add_(100)  # after the copy: the checkpoint keeps the old values
    io.save_checkpoint(state, tmp_path / "a.ckpt")  # replaces, like Lightning's overwrite
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "b.ckpt")
    io.teardown()
    assert torch.equal(io.load_checkpoint(tmp_path / "b.ckpt")["state_dict"]["w"],
                       torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["b.ckpt"]
