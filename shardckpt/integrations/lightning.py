"""Lightning ``CheckpointIO`` plugins that write shardckpt checkpoints.

    from shardckpt.integrations.lightning import ShardCkptIO
    trainer = Trainer(plugins=[ShardCkptIO()],
                      callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=2, save_last=True)])
    trainer.fit(model, ckpt_path="last")          # resumes from the newest last.ckpt

Every checkpoint Lightning writes (``ModelCheckpoint``'s top-k, ``last``, ``every_n_train_steps``,
``trainer.save_checkpoint``, the SLURM requeue save ``hpc_ckpt_N.ckpt``) becomes a shardckpt
folder with that name: atomic, checksummed, compressed, loaded without unpickling.
``AsyncShardCkptIO`` saves in the background (the training stalls only for the copy) in the
style of Lightning's ``AsyncCheckpointIO``; the SLURM requeue save is always waited for, since
the job is about to stop.

Strategies: Lightning calls the plugin on global rank 0 with the full checkpoint (single
device, DDP, and FSDP with ``state_dict_type="full"``), so that rank saves alone
(``shardckpt.dist.rounds.local_only``) and every rank loads it. For sharded checkpoints of FSDP2 /
tensor parallelism, ``ShardCkptModelParallelStrategy`` (a ``ModelParallelStrategy``) saves every
rank's DTensor shards collectively, and loads them resharded to the current world size. Needs
``pip install 'shardckpt[lightning]'``.
"""

from __future__ import annotations

import os
from typing import Any

from . import require

_io = require("lightning.fabric.plugins.io.checkpoint_io", "lightning", "ShardCkptIO")

from .. import api
from ..save import SaveHandle, async_save  # noqa: E402  (after the extra's check, for its message)
from ..format.retire import remove_checkpoint as delete_checkpoint  # noqa: E402
from ..dist.rounds import local_only  # noqa: E402
from ..storage import open_checkpoint  # noqa: E402

__all__ = ["ShardCkptIO", "AsyncShardCkptIO", "ShardCkptModelParallelStrategy"]

HPC_PREFIX = "hpc_ckpt_"  # Lightning's SLURM requeue checkpoint (SignalConnector)


class ShardCkptIO(_io.CheckpointIO):
    """Save and load Lightning checkpoints as shardckpt checkpoints.

    Args:
        async_save: save in the background (see ``AsyncShardCkptIO``).
        save_options: keyword arguments for ``shardckpt.save`` (``codec``, ``level``...).
        storage_options: passed to the storage backend for URLs.
    """

    def __init__(self, *, async_save: bool = False, save_options: dict | None = None,
                 storage_options: dict | None = None):
        self.async_save = async_save
        self.save_options = dict(save_options or {})
        self.storage_options = storage_options
        self._handle: SaveHandle | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        """Write ``checkpoint`` as the shardckpt folder ``path`` (replacing one there)."""
        path = os.fspath(path)
        options = {"storage_options": storage_options or self.storage_options,
                   **self.save_options, "overwrite": True,
                   "metadata": {**self.save_options.get("metadata", {}),
                                "lightning": _summary(checkpoint)}}
        self._check_previous()
        with local_only():  # Lightning calls this on global rank 0 only
            if self.async_save and not os.path.basename(path).startswith(HPC_PREFIX):
                self._handle = async_save(checkpoint, path, **options)
            else:
                api.save(checkpoint, path, **options)

    def load_checkpoint(self, path, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint at ``path`` as Lightning's dict (CPU tensors, or moved by
        ``map_location``). Nothing is unpickled, whatever ``weights_only`` says."""
        self.wait()
        checkpoint = api.load_full(os.fspath(path), storage_options=self.storage_options)
        if map_location is not None:
            checkpoint = _move(checkpoint, map_location)
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        """Delete the checkpoint folder at ``path`` (out of sight first, never half-seen)."""
        path = os.fspath(path)
        if self._handle is not None and self._handle.path.rstrip("/") == _url(path):
            self.wait()
        storage, name = open_checkpoint(path, self.storage_options)
        if storage.exists(name):
            delete_checkpoint(storage, name)

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
    """``ShardCkptIO`` saving in the background: ``save_checkpoint`` returns once the state is
    copied out; a failure is raised by the next save, load or ``teardown``."""

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
        api.save(checkpoint, path, overwrite=True, storage_options=storage_options)

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
        return {k: v for k, v in target.items() if k not in SHARDED_KEYS}

    def remove_checkpoint(self, filepath) -> None:
        """Delete the checkpoint folder (rank 0, out of sight first)."""
        if self.is_global_zero:
            storage, name = open_checkpoint(os.fspath(filepath))
            if storage.exists(name):
                delete_checkpoint(storage, name)


def _top_keys(path: str) -> list:
    from ..format.opening import open_manifest
    from ..format.tree import dict_items, node_kind
    storage, name = open_checkpoint(path)
    kind, payload = node_kind(open_manifest(storage, name).tree)
    return [k for k, _ in dict_items(payload)] if kind == "dict" else []


def _url(path: str) -> str:
    storage, name = open_checkpoint(path)
    return storage.url(name).rstrip("/")


def _summary(checkpoint: dict) -> dict:
    """A few JSON facts for ``shardckpt ls`` / ``inspect``: epoch and global step."""
    return {k: checkpoint[k] for k in ("epoch", "global_step")
            if isinstance(checkpoint.get(k), int)}


def _move(value, map_location):
    import torch
    if isinstance(value, torch.Tensor):
        if callable(map_location):
            return map_location(value, None)
        return value.to(map_location if not isinstance(map_location, dict)
                        else map_location.get(str(value.device), value.device))
    if isinstance(value, dict):
        return {k: _move(v, map_location) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, map_location) for v in value)
    return value

