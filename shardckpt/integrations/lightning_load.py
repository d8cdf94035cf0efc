"""Reading Lightning checkpoints of either format: shardckpt folders and ``torch.save`` files.

A project that switches to ``ShardCkptIO`` mid-run still has ``.ckpt`` files written by
Lightning's default ``TorchCheckpointIO``, and Lightning reads some paths itself without asking
the plugin (``LightningModule.load_from_checkpoint`` calls ``pl_load``). ``load_any`` reads
both formats; ``install_loader`` makes Lightning's own ``pl_load`` understand folders.
"""

from __future__ import annotations

import os
import pickle
import threading
from typing import Any

from ..errors import CheckpointNotFoundError, UnsafeCheckpointError
from ..load import load_full
from ..storage import open_checkpoint
from . import portable

_LOCK = threading.Lock()
_IN_FLIGHT: dict[str, Any] = {}  # url -> SaveHandle of a background save (any plugin)
_ORIGINAL: list = []  # Lightning's own ``cloud_io._load`` once install_loader replaced it


def checkpoint_url(path, storage_options: dict | None = None) -> str:
    """The normalised URL of a checkpoint path (the key saves in flight are known by)."""
    storage, name = open_checkpoint(path, storage_options)
    return storage.url(name).rstrip("/")


def track(path: str, handle, storage_options: dict | None = None) -> None:
    """Remember a background save to ``path`` until it finishes, so that any reader of the
    process (another Trainer's plugin, ``pl_load``) waits for it instead of missing it."""
    with _LOCK:
        for url in [u for u, h in _IN_FLIGHT.items() if h.done()]:
            del _IN_FLIGHT[url]  # finished: nothing to wait for (the owner keeps any error)
        _IN_FLIGHT[checkpoint_url(path, storage_options)] = handle


def wait_for(path, storage_options: dict | None = None) -> None:
    """Block until no background save of this process is writing ``path``. Its error, if
    any, is left for the plugin that started it to raise."""
    with _LOCK:
        handle = _IN_FLIGHT.pop(checkpoint_url(path, storage_options), None)
    if handle is not None:
        try:
            handle.result()
        except Exception:  # noqa: BLE001 - the owning plugin raises it (SaveHandle keeps it)
            pass


def _kind(path, storage_options: dict | None) -> str:
    """"folder", "file" or "missing" for what stands at ``path``."""
    storage, name = open_checkpoint(path, storage_options)
    if not storage.exists(name):
        return "missing"
    try:
        storage.list(name)
    except NotADirectoryError:
        return "file"
    return "folder"


def load_folder(path, map_location: Any = None, storage_options: dict | None = None) -> dict:
    """A shardckpt checkpoint folder as Lightning's dict, moved by ``map_location``."""
    wait_for(path, storage_options)
    checkpoint = portable.decode(load_full(os.fspath(path), storage_options=storage_options))
    return move(checkpoint, map_location) if map_location is not None else checkpoint


def load_torch_file(path, map_location: Any = None, weights_only: bool | None = None) -> dict:
    """A ``torch.save`` checkpoint through Lightning's own reader, without unpickling code
    unless ``weights_only is False`` (the caller's explicit opt-in for a trusted file).

    Raises:
        UnsafeCheckpointError: the file needs the full unpickler and no opt-in was given.
    """
    reader = _ORIGINAL[0] if _ORIGINAL else _lightning_load()
    safe = weights_only is not False
    try:
        return reader(path, map_location=map_location, weights_only=safe)
    except pickle.UnpicklingError as exc:
        if not safe:
            raise
        raise UnsafeCheckpointError(
            f"{os.fspath(path)}: a torch.save checkpoint holding objects the weights-only "
            "unpickler refuses; if you trust the file, pass weights_only=False "
            "(trainer.fit(..., weights_only=False)) or ShardCkptIO(allow_pickle=True)") from exc


def load_any(path, map_location: Any = None, weights_only: bool | None = None,
             storage_options: dict | None = None) -> dict:
    """Lightning's checkpoint dict from a shardckpt folder or a ``torch.save`` file.

    Raises:
        CheckpointNotFoundError: nothing at ``path`` (Lightning's wording, "Checkpoint file
            not found"). UnsafeCheckpointError: see ``load_torch_file``. CheckpointError: a
            folder that is not a committed checkpoint, or fails its checks.
    """
    wait_for(path, storage_options)
    kind = _kind(path, storage_options)
    if kind == "missing":
        raise CheckpointNotFoundError(f"Checkpoint file not found: {os.fspath(path)}")
    if kind == "file":
        return load_torch_file(path, map_location, weights_only)
    return load_folder(path, map_location, storage_options)


def _lightning_load():
    from lightning.fabric.utilities import cloud_io
    return getattr(cloud_io._load, "__wrapped__", cloud_io._load)


def _is_folder(path) -> bool:
    if not isinstance(path, (str, os.PathLike)) or str(path).startswith("http"):
        return False
    try:
        return _kind(path, None) == "folder"
    except (OSError, ValueError):
        return False


def install_loader() -> None:
    """Make Lightning's ``pl_load`` (``LightningModule.load_from_checkpoint``,
    ``lightning.fabric.utilities.cloud_io._load`` and the default ``TorchCheckpointIO``) read a
    shardckpt folder; every other path goes to Lightning's reader unchanged. Idempotent;
    ``ShardCkptIO()`` calls it."""
    from lightning.fabric.plugins.io import torch_io
    from lightning.fabric.utilities import cloud_io
    from lightning.pytorch.core import saving
    with _LOCK:
        if _ORIGINAL:
            return
        original = cloud_io._load

        def pl_load(path_or_url, map_location=None, weights_only=None):
            if _is_folder(path_or_url):
                return load_folder(path_or_url, map_location)
            return original(path_or_url, map_location=map_location, weights_only=weights_only)

        pl_load.__wrapped__ = original
        _ORIGINAL.append(original)
        # Lightning binds the function by name in each module at import: rebind those names.
        for module in (cloud_io, torch_io, saving):
            for attr in ("_load", "pl_load"):
                if getattr(module, attr, None) is original:
                    setattr(module, attr, pl_load)


def move(value, map_location):
    """``value`` with every tensor moved as ``torch.load``'s ``map_location`` says."""
    import torch
    if isinstance(value, torch.Tensor):
        if callable(map_location):  # torch.load's (storage, location) hook; None: keep it
            moved = map_location(value, str(value.device))
            return value if moved is None else moved
        if isinstance(map_location, dict):
            return value.to(map_location.get(str(value.device), value.device))
        return value.to(map_location)
    if isinstance(value, dict):
        return {k: move(v, map_location) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move(v, map_location) for v in value)
    return value

