"""``on_event`` of the Lightning plugins, the HF Trainer mixin and the torchtitan backend, with
the real frameworks: each reports ``save_committed`` (step, path, epoch, metrics) once a
checkpoint commits, on the thread that commits it, and ``removed`` when its retention deletes
one; a callback that raises never fails a save; a real ``WandbCheckpoints`` (offline run)
through the Lightning plugin keeps reference artifacts in step with ``save_top_k``."""

import importlib.util
import json
import logging
import os
from urllib.parse import unquote

import pytest
import torch

import shardckpt
from tests.integrations import hook_recorder
from tests.integrations.hook_recorder import Recorder
from tests.integrations.tracker_servers import wandb_offline_records

COMMITTED, REMOVED = "save_committed", "removed"


def _needs(module):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"needs {module}")


# ------------------------------------------------------------------------------ Lightning
def _fit(tmp_path, plugin, epochs=4, scores=(0.5, 0.2, 0.9, 0.4)):
    """A tiny model for ``epochs`` epochs of 2 batches; ModelCheckpoint keeps the best 2 by a
    scripted ``val_loss`` (one per epoch): saves at steps 2, 4 and 8 (0.9 is no top 2), and
    removes step 2 when step 8 comes in."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, _):
            return self.net(batch[0]).pow(2).mean()

        def validation_step(self, batch, _):
            self.log("val_loss", scores[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)),
                                       batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2,
                           filename="{epoch}-{step}")
    trainer = L.Trainer(max_epochs=epochs, plugins=[plugin], callbacks=[ckpt],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(Tiny(), data, data)
    return ckpt


@_needs("lightning")
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_lightning_plugin_reports_commits_and_top_k_removals(tmp_path, flavour):
    from shardckpt.integrations.lightning import AsyncShardCkptIO, ShardCkptIO
    rec = Recorder()
    plugin = (AsyncShardCkptIO if flavour == "async" else ShardCkptIO)(on_event=rec)
    ckpt = _fit(tmp_path, plugin)
    folder = str(tmp_path / "ckpt")
    assert rec.of(COMMITTED) == [(2, f"{folder}/epoch=0-step=2.ckpt"),
                                 (4, f"{folder}/epoch=1-step=4.ckpt"),
                                 (8, f"{folder}/epoch=3-step=8.ckpt")]
    assert rec.of(REMOVED) == [(2, f"{folder}/epoch=0-step=2.ckpt")]
    assert ckpt.best_model_path == f"{folder}/epoch=1-step=4.ckpt"
    assert sorted(os.listdir(folder)) == ["epoch=1-step=4.ckpt", "epoch=3-step=8.ckpt"]
    first = next(e for e, _ in rec.events if e.kind == COMMITTED)
    assert first.epoch == 0 and first.metrics == {"val_loss": 0.5}
    assert first.raw_bytes > 0 and first.stored_bytes > 0
    threads = {t for e, t in rec.events if e.kind == COMMITTED}
    if flavour == "sync":
        assert threads == {"MainThread"}
    else:  # the writer's, unless a tiny save had committed before the plugin asked
        assert all(t.startswith("shardckpt-async-save") or t == "MainThread" for t in threads)


@_needs("lightning")
def test_a_failing_callback_never_fails_a_save(tmp_path, caplog):
    from shardckpt.integrations.lightning import ShardCkptIO

    def broken(event):
        raise RuntimeError("tracker down")

    io = ShardCkptIO(on_event=broken)
    with caplog.at_level(logging.ERROR, logger="shardckpt"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1, "epoch": 0},
                           tmp_path / "a.ckpt")
        io.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()
    assert caplog.text.count("on_event callback failed") == 2


@_needs("lightning")
@_needs("wandb")
def test_wandb_checkpoints_through_the_lightning_plugin(tmp_path, monkeypatch):
    import wandb
    from shardckpt.integrations.lightning import ShardCkptIO
    from shardckpt.integrations.wandb import WandbCheckpoints
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="ckpt-hooks", dir=str(tmp_path))
    try:
        tracker = WandbCheckpoints(monitor="val_loss", mode="min")
        _fit(tmp_path, ShardCkptIO(on_event=tracker))
        assert tracker.close(30) and tracker.failures == 0
        name = tracker.name
    finally:
        run.finish()
    arts, removed = wandb_offline_records(tmp_path, name)
    first = {json.loads(a.metadata)["step"]: a for a in reversed(arts)}
    assert sorted(first) == [2, 4, 8]
    folder = tmp_path / "ckpt"
    for step, art in first.items():
        meta = json.loads(art.metadata)
        path = folder / f"epoch={step // 2 - 1}-step={step}.ckpt"
        assert meta["uri"] == str(path) and meta["epoch"] == step // 2 - 1
        assert meta["metrics"]["val_loss"] > 0 and meta["manifest_crc32c"] > 0
        entries = {e.path: e for e in art.manifest.contents}
        data = entries[f"{path.name}/data/rank-00000.bin"]
        # a reference (the URI quotes Lightning's "="): nothing copied
        assert unquote(data.ref) == f"file://{path}/data/rank-00000.bin"
    holder = {}
    for art in arts:
        for alias in art.aliases:
            holder[alias] = json.loads(art.metadata)["step"]
    assert holder["best"] == 4 and holder["latest"] == 8
    assert removed[-1] == [2]  # the step save_top_k deleted is marked so
    assert sorted(os.listdir(folder)) == ["epoch=1-step=4.ckpt", "epoch=3-step=8.ckpt"]


# ------------------------------------------------------------------------------ HF Trainer
@_needs("transformers")
def test_hf_trainer_reports_commits_and_save_total_limit_removals(tmp_path):
    from tests.integrations.test_transformers import Tokens, _args, _model
    from shardckpt.integrations.transformers import ShardCkptTrainer
    scripted = {2: 0.1, 4: 0.5, 6: 0.3}
    rec, trainer = Recorder(), None

    def metrics(_):
        return {"score": scripted[trainer.state.global_step]}

    trainer = ShardCkptTrainer(
        model=_model(), train_dataset=Tokens(12), eval_dataset=Tokens(4),
        compute_metrics=metrics, on_event=rec,
        args=_args(tmp_path, eval_strategy="steps", eval_steps=2, save_total_limit=2,
                   metric_for_best_model="score", greater_is_better=False))
    trainer.train()
    out = str(tmp_path)
    assert rec.of(COMMITTED) == [(s, os.path.join(out, f"checkpoint-{s}")) for s in (2, 4, 6)]
    assert rec.of(REMOVED) == [(4, os.path.join(out, "checkpoint-4"))]  # 2 is the best
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-6"]
    by_step = {e.step: e for e, _ in rec.events if e.kind == COMMITTED}
    assert by_step[4].metrics["eval_score"] == 0.5 and by_step[4].epoch == pytest.approx(4 / 3)
    assert all(t.startswith("shardckpt-async-save") or t == "MainThread"
               for e, t in rec.events if e.kind == COMMITTED)


# ------------------------------------------------------------------------------ torchtitan
@_needs("torchtitan")
@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_torchtitan_reports_commits_and_keep_latest_k_removals(tmp_path, async_mode):
    from shardckpt.integrations.torchtitan import ShardCkptCheckpointManager
    from tests.integrations import titan_job
    hook_recorder.EVENTS.clear()
    rec = Recorder()
    # as a config file names it (a string), or a Python config's callable
    on_event = "tests.integrations.hook_recorder:record" if async_mode == "async" else rec
    config = ShardCkptCheckpointManager.Config(
        enable=True, folder="ckpt", interval=2, keep_latest_k=2, last_save_model_only=False,
        handle_preemption=False, async_mode=async_mode, on_event=on_event)
    titan_job.train(0, 1, config, str(tmp_path), 8)
    events = hook_recorder.EVENTS if async_mode == "async" else rec.events
    folder = str(tmp_path / "ckpt")
    got = [(e.kind, e.step, e.path) for e, _ in events]
    committed = [(s, p) for k, s, p in got if k == COMMITTED]
    assert committed == [(s, f"{folder}/step-{s}") for s in (2, 4, 6, 8)]
    assert [(s, p) for k, s, p in got if k == REMOVED] == [(2, f"{folder}/step-2"),
                                                           (4, f"{folder}/step-4")]
    assert got.index((REMOVED, 2, f"{folder}/step-2")) > got.index((COMMITTED, 6,
                                                                      f"{folder}/step-6"))
    assert sorted(os.listdir(folder)) == ["step-6", "step-8"]
    assert all(e.raw_bytes > 0 for e, _ in events if e.kind == COMMITTED)


def test_event_callback_takes_callables_and_dotted_paths():
    from shardckpt.observe import event_callback
    assert event_callback(None) is None and event_callback(print) is print
    assert event_callback("tests.integrations.hook_recorder.record") is hook_recorder.record
    assert isinstance(event_callback("tests.integrations.hook_recorder:Recorder"), Recorder)
    with pytest.raises(ValueError, match="cannot be imported"):
        event_callback("tests.integrations.hook_recorder.nothing")
    with pytest.raises(ValueError, match="not callable"):
        event_callback("tests.integrations.hook_recorder.EVENTS")


def test_done_callbacks_of_an_async_save_run_before_it_is_done(tmp_path):
    seen = []
    handle = shardckpt.async_save({"w": torch.ones(1000)}, tmp_path / "a")
    handle.add_done_callback(lambda info, err: seen.append((info.path, err, handle.done())))
    info = handle.result()
    assert seen[0][:2] == (info.path, None)
    handle.add_done_callback(lambda info, err: seen.append("late"))  # finished: at once
    assert seen[-1] == "late"
