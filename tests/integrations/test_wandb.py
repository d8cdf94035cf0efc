"""WandbCheckpoints in a real offline W&B run (``WANDB_MODE=offline``): the artifact records the
run writes to disk reference the checkpoints (nothing copied), carry their record, and their
aliases follow retention; ``resolve`` reads them back."""

import importlib.util
import json

import pytest
import torch

import shardckpt
from shardckpt.errors import CheckpointNotFoundError, TrackerError
from tests.integrations.tracker_servers import wandb_offline_records

pytestmark = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                reason="needs shardckpt[wandb]")

STATE = {"model": {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}}


@pytest.fixture
def offline_run(tmp_path, monkeypatch):
    import wandb
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="ckpt-test", dir=str(tmp_path))
    yield run
    run.finish()


def test_offline_run_records_reference_artifacts_with_moving_aliases(tmp_path, offline_run):
    from shardckpt.integrations.wandb import ARTIFACT_TYPE, WandbCheckpoints
    tracker = WandbCheckpoints()
    root = tmp_path / "ck"
    with shardckpt.CheckpointManager(root, keep_last=2, monitor="loss", on_event=tracker,
                                     save_options={"codec": "zstd"}) as mgr:
        for step, loss in [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.8)]:
            mgr.save(step, STATE, metrics={"loss": loss})
            mgr.wait()
            assert tracker.flush(30)
    assert tracker.close(30) and tracker.failures == 0
    name = tracker.name
    offline_run.finish()
    arts, removed = wandb_offline_records(tmp_path, name)
    first = {json.loads(a.metadata)["step"]: a for a in reversed(arts)}
    assert sorted(first) == [1, 2, 3, 4]
    for step, art in first.items():
        meta = json.loads(art.metadata)
        path = str(root / f"step-{step:08d}")
        assert art.type == ARTIFACT_TYPE and meta["uri"] == path
        assert meta["kind"] == "full" and meta["metrics"]["loss"] > 0
        assert meta["manifest_crc32c"] > 0 and meta["bytes_written"] > 0
        entries = {e.path: e for e in art.manifest.contents}
        data = entries[f"step-{step:08d}/data/rank-00000.bin"]
        assert data.ref == f"file://{path}/data/rank-00000.bin"  # a reference: no copy
        assert data.size == (root / f"step-{step:08d}/data/rank-00000.bin").stat().st_size \
            if step in mgr.steps() else data.size > 0
        assert entries["manifest.json"].digest  # the manifest's MD5
    # aliases: the last record naming an alias holds it
    holder = {}
    for art in arts:
        for alias in art.aliases:
            holder[alias] = json.loads(art.metadata)["step"]
    assert holder["latest"] == 4 and holder["step-3"] == 3
    assert holder["best"] == 3  # 0.5 (step 2) was removed by keep_last=2: best moved to 0.7
    assert removed[-1] == [1, 2]
    spec = f"ckpt-test/{name}"
    assert WandbCheckpoints.resolve(f"{spec}:latest", offline_dir=str(tmp_path)) == mgr.path(4)
    best = WandbCheckpoints.resolve(f"{spec}:best", offline_dir=str(tmp_path))
    assert best == mgr.path(3)
    got = {"model": {"w": torch.zeros(64, 64)}}
    shardckpt.load(got, best)
    assert torch.equal(got["model"]["w"], STATE["model"]["w"])
    with pytest.raises(CheckpointNotFoundError, match="removed by retention"):
        WandbCheckpoints.resolve(f"{spec}:step-2", offline_dir=str(tmp_path))


def test_no_active_run_is_a_typed_error(monkeypatch):
    import wandb
    from shardckpt.integrations.wandb import WandbCheckpoints
    monkeypatch.setattr(wandb, "run", None)
    with pytest.raises(TrackerError, match="wandb.init"):
        WandbCheckpoints()


def test_object_store_checkpoints_are_referenced_by_url_and_copy_adds_files(tmp_path, s3_url,
                                                                            offline_run):
    from shardckpt.integrations.wandb import WandbCheckpoints
    url, opts = s3_url
    by_ref = WandbCheckpoints(name="on-s3", storage_options=opts)
    with shardckpt.CheckpointManager(url, storage_options=opts, on_event=by_ref,
                                     async_save=False) as mgr:
        mgr.save(10, STATE, metrics={"loss": 1.0})
    copied = WandbCheckpoints(name="copied", copy=True)
    with shardckpt.CheckpointManager(tmp_path / "ck", on_event=copied,
                                     async_save=False) as local:
        local.save(3, STATE)
    assert by_ref.close(30) and copied.close(30), (by_ref.last_error, copied.last_error)
    offline_run.finish()
    (ref,), _ = wandb_offline_records(tmp_path, "on-s3")
    meta = json.loads(ref.metadata)
    assert meta["uri"] == mgr.path(10) and meta["bytes_written"] > 16384
    # one entry: the URL itself; nothing is listed, read or uploaded from the bucket
    assert [(e.ref, e.size) for e in ref.manifest.contents] == [(mgr.path(10), 0)]
    (copy,), _ = wandb_offline_records(tmp_path, "copied")
    entries = {e.path: e for e in copy.manifest.contents}
    assert not entries["step-00000003/data/rank-00000.bin"].ref  # a file of the artifact
    assert entries["step-00000003/data/rank-00000.bin"].local_path
