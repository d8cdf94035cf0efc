"""Lightning ``CheckpointIO`` plugins that write shardckpt checkpoints.

    from shardckpt.integrations.lightning import ShardCkptIO
    trainer = Trainer(plugins=[ShardCkptIO()],
                      callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=2, save_last=True)])
    trainer.fit(model, ckpt_path="last")          # resumes from the newest last.ckpt

Every checkpoint Lightning writes (``ModelCheckpoint``'s top-k, ``last``, ``every_n_train_steps``,
``trainer.save_checkpoint``, the SLURM requeue save ``hpc_ckpt_N.ckpt``) becomes a shardckpt
folder with that name: atomic, checksummed, compressed, loaded without unpickling.
Hyperparameters that are not plain JSON (OmegaConf configs, paths, enums...) are stored in a
typed form (``portable``); ``Model.load_from_checkpoint(folder)`` and ``pl_load`` read folders
once a plugin exists (``install_loader``); a ``torch.save`` ``.ckpt`` from before the switch
still loads (weights-only unless the caller opts in), so a running project switches mid-run.
``AsyncShardCkptIO`` saves in the background (the training stalls only for the copy) in the
style of Lightning's ``AsyncCheckpointIO``: a new checkpoint is written under its final name
(its manifest last), so that ModelCheckpoint's name checks and folder listings see it at once;
a save outside a Trainer run, and the SLURM requeue save, are waited for.

Strategies: Lightning calls the plugin on global rank 0 with the full checkpoint (single
device, DDP, and FSDP with ``state_dict_type="full"``), so that rank saves alone
(``shardckpt.dist.rounds.local_only``) and every rank loads it. For sharded checkpoints of FSDP2 /
tensor parallelism, ``ShardCkptModelParallelStrategy`` (a ``ModelParallelStrategy``) saves every
rank's DTensor shards collectively, and loads them resharded to the current world size. Needs
``pip install 'shardckpt[lightning]'``.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

from . import require

_io = require("lightning.fabric.plugins.io.checkpoint_io", "lightning", "ShardCkptIO")

from .. import api
from ..save import SaveHandle, async_save  # noqa: E402  (after the extra's check, for its message)
from ..format.retire import remove_checkpoint as delete_checkpoint  # noqa: E402
from ..format.root import OLD_MARK  # noqa: E402
from ..dist.rounds import local_only  # noqa: E402
from ..observe import REMOVED, SAVE_COMMITTED, emit  # noqa: E402
from ..storage import open_checkpoint  # noqa: E402
from . import portable  # noqa: E402
from .lightning_load import (checkpoint_url, install_loader, load_any, track,  # noqa: E402
                             wait_for)

__all__ = ["ShardCkptIO", "AsyncShardCkptIO", "ShardCkptModelParallelStrategy",
           "install_loader"]

HPC_PREFIX = "hpc_ckpt_"  # Lightning's SLURM requeue checkpoint (SignalConnector)


def _in_trainer_run() -> bool:
    """Whether a ``Trainer`` run (fit / validate / test / predict) is on this thread's stack."""
    from lightning.pytorch.trainer.trainer import Trainer
    run = Trainer._run.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is run:
            return True
        frame = frame.f_back
    return False


class ShardCkptIO(_io.CheckpointIO):
    """Save and load Lightning checkpoints as shardckpt checkpoints.

    Args:
        async_save: save in the background (see ``AsyncShardCkptIO``).
        save_options: keyword arguments for ``shardckpt.save`` (``codec``, ``level``...).
        storage_options: passed to the storage backend for URLs.
        allow_pickle: load ``torch.save`` checkpoints with the full unpickler even when the
            caller leaves ``weights_only`` unset (only for files you trust).
        on_event: called with a ``shardckpt.observe.CheckpointEvent``: ``save_committed``
            (step, path, epoch, the monitored metrics of ``ModelCheckpoint``) once each
            checkpoint commits, on the thread that commits it, and ``removed`` when Lightning
            deletes one (``save_top_k``); a callback that raises is logged, never raised
            (``MLflowCheckpoints`` / ``WandbCheckpoints`` fit here).
    """

    def __init__(self, *, async_save: bool = False, save_options: dict | None = None,
                 storage_options: dict | None = None, allow_pickle: bool = False,
                 on_event=None):
        self.async_save = async_save
        self.save_options = dict(save_options or {})
        self.storage_options = storage_options
        self.allow_pickle = allow_pickle
        self.on_event = on_event
        self._steps: dict[str, int] = {}  # checkpoint url -> the step saved there last
        self._handle: SaveHandle | None = None
        install_loader()  # so that load_from_checkpoint(folder) works after the switch

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        """Write ``checkpoint`` as the shardckpt folder ``path`` (replacing one there).

        Values the state tree cannot hold are stored in their typed form (``portable``), or
        as their repr with a ``PortableValueWarning``: a save never fails on a value.
        """
        path = os.fspath(path)
        storage_options = storage_options or self.storage_options
        options = {"storage_options": storage_options, **self.save_options, "overwrite": True,
                   "metadata": {**self.save_options.get("metadata", {}),
                                "lightning": _summary(checkpoint)}}
        state = portable.encode(checkpoint)
        self._check_previous()
        storage, name = open_checkpoint(path, storage_options)
        aside = _set_aside_old_file(storage, name)
        try:
            with local_only():  # Lightning calls this on global rank 0 only
                if aside is None and self._in_background(path):
                    self._handle = async_save(state, path, in_place=True, **options)
                    track(path, self._handle, storage_options)
                    self._handle.add_done_callback(
                        self._reporter(checkpoint, path, storage_options))
                else:
                    info = api.save(state, path, **options)
                    self._reporter(checkpoint, path, storage_options)(info, None)
        except BaseException:
            if aside is not None:
                storage.rename(aside, name)
            raise
        if aside is not None:
            storage.delete(aside)

    def _reporter(self, checkpoint: dict, path: str, storage_options):
        """The done callback that reports the save of ``checkpoint`` at ``path``."""
        step, facts = checkpoint.get("global_step"), _event_facts(checkpoint)
        url = checkpoint_url(path, storage_options)

        def report(info, error) -> None:
            if error is None and self.on_event is not None:
                self._steps[url] = step
                emit(self.on_event, SAVE_COMMITTED, step, path, seconds=info.seconds,
                     raw_bytes=info.raw_bytes, stored_bytes=info.stored_bytes, **facts)
        return report

    def _in_background(self, path: str) -> bool:
        # Outside a run (trainer.save_checkpoint after fit) nothing overlaps the save and the
        # caller expects the checkpoint when the call returns; the requeue save precedes exit.
        return (self.async_save and not os.path.basename(path).startswith(HPC_PREFIX)
                and self._in_run())

    @staticmethod
    def _in_run() -> bool:
        return _in_trainer_run()

    def load_checkpoint(self, path, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint at ``path`` as Lightning's dict (CPU tensors, or moved by
        ``map_location``): a shardckpt folder (never unpickled), or a ``torch.save`` file from
        before the switch, read weights-only unless ``weights_only=False`` or ``allow_pickle``.

        Raises:
            CheckpointNotFoundError: nothing at ``path``. UnsafeCheckpointError: a pickle that
                needs the full unpickler, without an opt-in. CheckpointError: a folder that
                is not a committed, intact checkpoint.
        """
        self.wait()
        if weights_only is None and self.allow_pickle:
            weights_only = False
        return load_any(path, map_location, weights_only, self.storage_options)

    def remove_checkpoint(self, path) -> None:
        """Delete the checkpoint at ``path``: a folder out of sight first (never half-seen);
        a ``torch.save`` file from before the switch like Lightning's own plugin does."""
        path = os.fspath(path)
        if self._handle is not None and self._handle.path.rstrip("/") == \
                checkpoint_url(path, self.storage_options):
            self.wait()
        wait_for(path, self.storage_options)
        storage, name = open_checkpoint(path, self.storage_options)
        if not storage.exists(name):
            return
        try:
            storage.list(name)
        except NotADirectoryError:
            storage.delete(name)
            return
        delete_checkpoint(storage, name)
        step = self._steps.pop(checkpoint_url(path, self.storage_options), None)
        if step is not None:
            emit(self.on_event, REMOVED, step, path, reason="lightning")

    def wait(self) -> None:
        """Wait for the save in flight to commit; raises its error."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.result()

    def _check_previous(self) -> None:
        if self._handle is not None and self._handle.done():
            self.wait()

    def teardown(self) -> None:
        """Flush the save in flight (Lightning calls this at the end of fit)."""
        self.wait()


class AsyncShardCkptIO(ShardCkptIO):
    """``ShardCkptIO`` saving in the background during a Trainer run: ``save_checkpoint``
    returns once the state is copied out, with the checkpoint's folder already under its
    name; a failure is raised by the next save, load or ``teardown``. Outside a run
    (``trainer.save_checkpoint`` after ``fit``) it saves before returning."""

    def __init__(self, **kwargs):
        kwargs.setdefault("async_save", True)
        super().__init__(**kwargs)


_mp = require("lightning.pytorch.strategies", "lightning", "ShardCkptModelParallelStrategy")
SHARDED_KEYS = ("state_dict", "optimizer_states")


class ShardCkptModelParallelStrategy(_mp.ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` / tensor parallel in
    ``configure_model``) with sharded shardckpt checkpoints instead of DCP's.

    Every rank saves its DTensor shards of the model and optimizer states (collective; the
    other entries are replicated and written once). Loading reads into the current sharding,
    whatever world size saved, and returns the remaining entries to Lightning. Takes the
    ``ModelParallelStrategy`` arguments.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath,
                        storage_options: Any = None) -> None:
        """Save ``checkpoint`` (sharded state dicts included) at ``filepath`` on every rank."""
        path = self.broadcast(os.fspath(filepath))
        api.save(portable.encode(checkpoint), path, overwrite=True,
                 storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Fill the model and optimizers from ``checkpoint_path`` (resharded); the rest."""
        from torch.distributed.checkpoint import state_dict as sd
        path = self.broadcast(os.fspath(checkpoint_path))
        saved = _top_keys(path)
        model_sd = sd.get_model_state_dict(self.model)
        optim_sds = [sd.get_optimizer_state_dict(self.model, o) for o in self.optimizers]
        # Entries other than the sharded ones are replaced whole (None is a placeholder); so are
        # the optimizer states when there are no optimizers (validate / test / predict).
        target = {k: None for k in saved if k != "state_dict"}
        target["state_dict"] = model_sd
        if "optimizer_states" in saved and optim_sds:
            target["optimizer_states"] = optim_sds
        api.load(target, path, strict=self.lightning_module.strict_loading)
        sd.set_model_state_dict(self.model, model_sd,
                                options=sd.StateDictOptions(strict=self.lightning_module
                                                            .strict_loading))
        for opt, osd in zip(self.optimizers, target.get("optimizer_states") or []):
            sd.set_optimizer_state_dict(self.model, opt, osd)
        return portable.decode({k: v for k, v in target.items() if k not in SHARDED_KEYS})

    def remove_checkpoint(self, filepath) -> None:
        """Delete the checkpoint folder (rank 0, out of sight first)."""
        if self.is_global_zero:
            storage, name = open_checkpoint(os.fspath(filepath))
            if storage.exists(name):
                delete_checkpoint(storage, name)


def _set_aside_old_file(storage, name: str) -> str | None:
    """Move a ``torch.save`` file standing at ``name`` (Lightning's format, from before the
    switch) to a hidden ``.<name>.old-<random>``, so that a folder can take the name; until a
    checkpoint is committed there, ``leftovers`` cleanup keeps it. Returns that name, or None."""
    if not storage.exists(name):
        return None
    try:
        storage.list(name)
        return None
    except NotADirectoryError:
        pass
    aside = f".{name}{OLD_MARK}{secrets.token_hex(6)}"
    storage.rename(name, aside)
    return aside


def _top_keys(path: str) -> list:
    from ..format.opening import open_manifest
    from ..format.tree import dict_items, node_kind
    storage, name = open_checkpoint(path)
    kind, payload = node_kind(open_manifest(storage, name).tree)
    return [k for k, _ in dict_items(payload)] if kind == "dict" else []


def _event_facts(checkpoint: dict) -> dict:
    """``epoch`` and ``metrics`` of a checkpoint's event: the score each ``ModelCheckpoint``
    in it monitors (Lightning keeps the step's metrics nowhere else in the checkpoint)."""
    metrics = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and \
                state.get("current_score") is not None:
            score = state["current_score"]
            metrics[state["monitor"]] = float(score.item() if hasattr(score, "item") else score)
    return {"epoch": checkpoint.get("epoch"), "metrics": metrics or None}


def _summary(checkpoint: dict) -> dict:
    """A few JSON facts for ``shardckpt ls`` / ``inspect``: epoch and global step."""
    return {k: checkpoint[k] for k in ("epoch", "global_step")
            if isinstance(checkpoint.get(k), int)}
