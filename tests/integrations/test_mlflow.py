"""MLflowCheckpoints against a real ``mlflow server`` (sqlite store, local artifact root) on
loopback: checkpoints registered by reference, aliases that follow retention, resolve, and a
tracker that is down while the training saves."""

import importlib.util
import logging
import os
import time

import pytest
import torch

import shardckpt
from shardckpt.errors import CheckpointNotFoundError, TrackerError
from shardckpt.observe import DEMOTED, CheckpointEvent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                reason="needs shardckpt[mlflow]")

STATE = {"model": {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64)},
         "step": 0}
LOSSES = [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.8), (5, 0.6)]


@pytest.fixture
def server(mlflow_server):
    """The session's mlflow server (tests/conftest.py)."""
    return mlflow_server


@pytest.fixture
def client(server, monkeypatch):
    import mlflow
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our worker retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow.set_tracking_uri(server.url)
    yield mlflow.MlflowClient(server.url)
    mlflow.set_tracking_uri(None)


def _run(client, name):
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    return client.create_run(exp_id).info


def _models(client, run):
    from shardckpt.integrations.mlflow import MODEL_TYPE
    found = client.search_logged_models([run.experiment_id],
                                        filter_string=f"source_run_id = '{run.run_id}'")
    assert all(m.model_type == MODEL_TYPE for m in found)
    return {int(m.tags["shardckpt.step"]): m for m in found}


def test_checkpoints_are_logged_models_by_reference_and_follow_retention(tmp_path, client,
                                                                         server):
    from shardckpt.integrations.mlflow import MLflowCheckpoints
    run = _run(client, "retention")
    tracker = MLflowCheckpoints(run.run_id, server.url)
    with shardckpt.CheckpointManager(tmp_path / "ck", keep_last=2, keep_best=1,
                                     monitor="loss", on_event=tracker) as mgr:
        for step, loss in LOSSES:
            mgr.save(step, STATE, metrics={"loss": loss, "note": "text is skipped"})
            mgr.wait()
            assert tracker.flush(30)  # one at a time: every step is registered before removal
    assert tracker.close(30) and tracker.failures == 0
    models = _models(client, run)
    assert sorted(models) == [1, 2, 3, 4, 5]
    kept = {s for s, m in models.items() if m.tags["shardckpt.state"] == "kept"}
    assert kept == set(mgr.steps()) == {2, 4, 5}
    for step, m in models.items():
        path = str(tmp_path / "ck" / f"step-{step:08d}")
        assert m.tags["shardckpt.uri"] == path and m.name == f"step-{step:08d}"
        assert m.tags["mlflow.model.isExternal"] == "true"
        assert m.tags["shardckpt.kind"] == "full" and int(m.tags["shardckpt.bytes_written"]) > 16384
        assert [(x.key, x.value, x.step) for x in m.metrics] == [("loss", dict(LOSSES)[step], step)]
        assert not client.list_logged_model_artifacts(m.model_id)  # nothing uploaded
        removed = step not in kept
        assert (m.tags.get("shardckpt.deleted") == "true") == removed
    crc = shardckpt.verify(models[5].tags["shardckpt.uri"])  # the manifest's own checksum
    assert crc.ok
    aliases = {s: sorted(k.rsplit(".", 1)[1] for k in m.tags if k.startswith("shardckpt.alias."))
               for s, m in models.items()}
    assert aliases == {1: [], 2: ["best"], 3: [], 4: [], 5: ["latest"]}
    assert MLflowCheckpoints.resolve(run.run_id, "latest", server.url) == models[5].tags["shardckpt.uri"]
    best = MLflowCheckpoints.resolve(run.run_id, "best", server.url)
    assert best.endswith("step-00000002")
    assert MLflowCheckpoints.resolve(run.run_id, 4, server.url).endswith("step-00000004")
    loaded = {"model": {"w": torch.zeros(64, 64)}, "step": -1}
    shardckpt.load(loaded, best)
    assert torch.equal(loaded["model"]["w"], STATE["model"]["w"])
    with pytest.raises(CheckpointNotFoundError, match="removed by retention"):
        MLflowCheckpoints.resolve(run.run_id, "step-00000003", server.url)
    found = client.search_logged_models([run.experiment_id], filter_string=(
        f"source_run_id = '{run.run_id}' AND metrics.loss < 0.65 AND "
        "tags.`shardckpt.state` = 'kept'"))
    assert sorted(int(m.tags["shardckpt.step"]) for m in found) == [2, 5]


def test_best_moves_when_retention_removes_it_and_demotion_is_tagged(tmp_path, client, server):
    from shardckpt.integrations.mlflow import MLflowCheckpoints
    run = _run(client, "moves")
    tracker = MLflowCheckpoints(run.run_id, server.url, on_removed="delete")
    with shardckpt.CheckpointManager(tmp_path / "ck", keep_last=2, monitor="loss",
                                     mode="max", on_event=tracker, async_save=False) as mgr:
        for step, loss in [(1, 0.9), (2, 0.5), (3, 0.7)]:
            mgr.save(step, STATE, metrics={"loss": loss})
            assert tracker.flush(30)
        # issue 27 demotes from retention; its event is what the tracker reads
        tracker(CheckpointEvent(DEMOTED, 2, mgr.path(2)))
        tracker(CheckpointEvent("some_future_kind", 3, mgr.path(3)))  # passes by
    assert tracker.close(30) and tracker.failures == 0
    models = _models(client, run)
    assert sorted(models) == [2, 3]  # step 1 was deleted from the tracker (on_removed)
    assert models[2].tags["shardckpt.kind"] == "weights"
    assert models[2].tags["shardckpt.state"] == "demoted"
    assert "shardckpt.alias.best" in models[3].tags  # max mode: 0.7 now that 0.9 is gone
    assert MLflowCheckpoints.resolve(run.run_id, "best", server.url) == mgr.path(3)


def test_a_tracker_that_is_down_never_fails_or_stalls_a_save(tmp_path, client, server, caplog):
    from shardckpt.integrations.mlflow import MLflowCheckpoints
    from tests.integrations.tracker_servers import Relay
    run = _run(client, "down")
    relay = Relay(server.port)
    relay.down()
    tracker = MLflowCheckpoints(run.run_id, f"http://127.0.0.1:{relay.port}",
                                retry_max_seconds=0.5)
    caplog.set_level(logging.WARNING, logger="shardckpt")
    try:
        with shardckpt.CheckpointManager(tmp_path / "ck", keep_last=2, on_event=tracker,
                                         async_save=False) as mgr:
            for step in (1, 2, 3):
                t0 = time.perf_counter()
                mgr.save(step, STATE)
                assert time.perf_counter() - t0 < 5
        assert mgr.steps() == [2, 3]  # committed, retention ran
        assert not tracker.flush(2) and tracker.failures >= 1
        assert "could not register save_committed" in caplog.text
        relay.restore()  # the tracker is back: the queue drains in order
        assert tracker.flush(60)
        tracker.close()
    finally:
        relay.close()
    models = _models(client, run)
    assert {s for s, m in models.items() if m.tags["shardckpt.state"] == "kept"} == {2, 3}
    assert MLflowCheckpoints.resolve(run.run_id, "latest", server.url) == mgr.path(3)


def test_copy_uploads_only_when_asked_and_a_missing_run_is_a_typed_error(tmp_path, client,
                                                                         server):
    import mlflow
    from shardckpt.integrations.mlflow import MLflowCheckpoints
    with pytest.raises(TrackerError, match="no active MLflow run"):
        MLflowCheckpoints()
    mlflow.set_experiment("copy")
    with mlflow.start_run() as active:
        tracker = MLflowCheckpoints(copy=True)  # the active run, the current tracking URI
        with shardckpt.CheckpointManager(tmp_path / "ck", on_event=tracker,
                                         async_save=False) as mgr:
            mgr.save(7, STATE)
        assert tracker.close(30)
    (model,) = _models(client, active.info).values()
    names = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert "manifest.json" in names and "mlflow.model.isExternal" not in model.tags
