"""Switching a Lightning project to ShardCkptIO with one line loses nothing: hyperparameters
that are not plain JSON (OmegaConf, Path, Enum) round-trip, ``load_from_checkpoint`` and
``pl_load`` read a checkpoint folder, a run resumes from an old ``torch.save`` .ckpt (pickles
refused unless asked for), and the async plugin takes a checkpoint's name at once, saves
outside ``fit`` before returning, and never reuses a name in flight. In-process Trainers on CPU
with a tiny model."""

import enum
import importlib.util
import os
import pathlib
import threading

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="needs shardckpt[lightning]")


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


def _tiny(config=None, **hparams):
    """``(class, instance)`` of a one-layer module; its hyperparameters are ``hparams``, or
    the whole ``config`` object as Hydra users pass it."""
    import lightning as L
    import torch

    class Tiny(L.LightningModule):
        def __init__(self, **kwargs):
            super().__init__()
            self.save_hyperparameters(config) if config is not None else \
                self.save_hyperparameters()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=g),
                                                  torch.randn(8, 1, generator=g))
            return torch.utils.data.DataLoader(data, batch_size=4)

    return Tiny, Tiny(**hparams)


def _trainer(root, plugins=(), epochs=1, callbacks=(), **kwargs):
    import lightning as L
    return L.Trainer(default_root_dir=root, max_epochs=epochs, plugins=list(plugins),
                     callbacks=list(callbacks), logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", devices=1, **kwargs)


def test_hparams_beyond_json_round_trip_without_pickle(tmp_path):
    import omegaconf
    from shardckpt.integrations.lightning import ShardCkptIO
    cfg = omegaconf.OmegaConf.create({"lr": 0.1, "warm": "${lr}", "layers": [4, 1]})

    _, model = _tiny(cfg=cfg, data=pathlib.Path("/data/train"), mode=Mode.SLOW,
                     tags={"a", "b"})
    trainer = _trainer(tmp_path, [ShardCkptIO()])
    trainer.fit(model)  # used to raise UnsupportedValueError on the first save
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    hp = ShardCkptIO().load_checkpoint(tmp_path / "end.ckpt")["hyper_parameters"]
    assert isinstance(hp["cfg"], omegaconf.DictConfig) and hp["cfg"].warm == 0.1
    assert hp["data"] == pathlib.Path("/data/train") and hp["mode"] is Mode.SLOW
    assert hp["tags"] == {"a", "b"}

    trainer = _trainer(tmp_path, [ShardCkptIO()], max_steps=1)
    trainer.fit(_tiny(config=cfg)[1])  # hparams is the DictConfig itself, and its class saved
    trainer.save_checkpoint(tmp_path / "hydra.ckpt")
    saved = ShardCkptIO().load_checkpoint(tmp_path / "hydra.ckpt")
    assert saved["hparams_type"] is omegaconf.DictConfig
    assert isinstance(saved["hyper_parameters"], omegaconf.DictConfig)


def test_values_without_a_typed_form_are_kept_readable_with_a_warning(tmp_path):
    import torch
    from shardckpt.integrations.lightning import ShardCkptIO
    from shardckpt.integrations.portable import PortableValueWarning

    class Opaque:
        def __repr__(self):
            return "Opaque(7)"

    io = ShardCkptIO()
    with pytest.warns(PortableValueWarning, match="hyper_parameters/loss.*Opaque"):
        io.save_checkpoint({"hyper_parameters": {"loss": Opaque(), "__shardckpt__": 1},
                            "state_dict": {"w": torch.ones(2)}}, tmp_path / "a.ckpt")
    hp = io.load_checkpoint(tmp_path / "a.ckpt")["hyper_parameters"]
    assert hp == {"loss": "Opaque(7)", "__shardckpt__": 1}  # the user's own tag key kept


def test_load_from_checkpoint_and_pl_load_read_a_folder(tmp_path):
    import torch
    from lightning.fabric.utilities.cloud_io import _load as pl_load
    from lightning.pytorch.callbacks import ModelCheckpoint
    from shardckpt.integrations.lightning import ShardCkptIO
    Tiny, model = _tiny(width=4)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train_loss", save_top_k=1)
    _trainer(tmp_path, [ShardCkptIO()], epochs=2, callbacks=[best]).fit(model)
    assert (pathlib.Path(best.best_model_path) / "manifest.json").is_file()
    loaded = Tiny.load_from_checkpoint(best.best_model_path)
    assert loaded.hparams.width == 4
    assert torch.equal(loaded.net.weight, model.net.weight)
    assert pl_load(best.best_model_path)["global_step"] == 4


def _old_ckpt(tmp_path, extra=None):
    """A run trained with Lightning's own torch.save format, as before the switch."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    _, model = _tiny()
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    if extra is not None:
        model.on_save_checkpoint = lambda checkpoint: checkpoint.update(extra)
    _trainer(tmp_path, epochs=1, callbacks=[last]).fit(model)
    assert os.path.isfile(tmp_path / "ckpt" / "last.ckpt")
    return tmp_path / "ckpt" / "last.ckpt"


def test_a_running_project_switches_from_torch_save_files(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from shardckpt.integrations.lightning import ShardCkptIO
    old = _old_ckpt(tmp_path)
    _, model = _tiny()
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [ShardCkptIO()], epochs=2, callbacks=[last])
    trainer.fit(model, ckpt_path=old)  # used to fail: "a folder whose save never committed"
    assert trainer.global_step == 4  # 2 steps restored + 2 trained
    assert (tmp_path / "ckpt" / "last.ckpt" / "manifest.json").is_file()  # now a folder
    assert ShardCkptIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["epoch"] == 1


class Trusted:
    """An object only the full unpickler can rebuild."""


def test_old_pickles_need_an_explicit_opt_in(tmp_path):
    from shardckpt.errors import CheckpointNotFoundError, UnsafeCheckpointError
    from shardckpt.integrations.lightning import ShardCkptIO
    old = _old_ckpt(tmp_path, extra={"trusted": Trusted()})
    with pytest.raises(UnsafeCheckpointError, match=r"last\.ckpt.*weights_only=False"):
        ShardCkptIO().load_checkpoint(old)
    assert isinstance(ShardCkptIO().load_checkpoint(old, weights_only=False)["trusted"], Trusted)
    assert isinstance(ShardCkptIO(allow_pickle=True).load_checkpoint(old)["trusted"], Trusted)
    with pytest.raises(CheckpointNotFoundError, match="Checkpoint file not found"):
        ShardCkptIO().load_checkpoint(tmp_path / "nothing.ckpt")
    ShardCkptIO().remove_checkpoint(old)  # ModelCheckpoint dropping an old top-k file
    assert not old.exists()


@pytest.fixture
def writer_held():
    """Holds the background writer until released (``writer_held.set()``), so that a save
    started meanwhile is deterministically still in flight."""
    from shardckpt.save import asyncsave
    gate = threading.Event()
    asyncsave._WRITER.submit(gate.wait, 30)
    yield gate
    gate.set()


def test_async_save_takes_its_name_at_once(tmp_path, writer_held):
    import torch
    from shardckpt.integrations.lightning import AsyncShardCkptIO
    io, path = AsyncShardCkptIO(), tmp_path / "epoch=0.ckpt"
    io._in_run = lambda: True  # as inside fit: in the background
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    # ModelCheckpoint picks names by fs.exists and lists the folder for "last" and versions:
    # a save in flight owns its name, and no temporary folder shows.
    assert os.path.exists(path) and os.listdir(tmp_path) == ["epoch=0.ckpt"]
    writer_held.set()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_async_save_outside_fit_is_there_when_it_returns(tmp_path, writer_held):
    from shardckpt.integrations.lightning import AsyncShardCkptIO
    _, model = _tiny()
    trainer = _trainer(tmp_path, [AsyncShardCkptIO()], epochs=5, max_steps=1,
                       enable_checkpointing=False)  # no save in fit: the writer stays held
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "after.ckpt")  # no training left to overlap with
    assert (tmp_path / "after.ckpt" / "manifest.json").is_file()
    writer_held.set()
    resumed = _trainer(tmp_path, [AsyncShardCkptIO()], epochs=5, max_steps=3)
    resumed.fit(_tiny()[1], ckpt_path=tmp_path / "after.ckpt")
    assert resumed.global_step == 3


def test_async_versions_never_reuse_a_name_in_flight(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from shardckpt.integrations.lightning import AsyncShardCkptIO
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, monitor="epoch",
                         filename="test")
    trainer = _trainer(tmp_path, [AsyncShardCkptIO()], epochs=2, callbacks=[mc])
    trainer.fit(_tiny()[1])
    trainer.fit_loop.max_epochs = 4
    trainer.fit(_tiny()[1])
    expected = {"test.ckpt", "test-v1.ckpt", "test-v2.ckpt", "test-v3.ckpt"}
    assert set(os.listdir(tmp_path / "ckpt")) == expected
    epochs = {AsyncShardCkptIO().load_checkpoint(tmp_path / "ckpt" / n)["epoch"]
              for n in expected}
    assert epochs == {0, 1, 2, 3}  # four checkpoints, none overwritten
