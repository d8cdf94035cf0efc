"""Where checkpoints live: one ``Storage`` interface, a local backend (fsspec comes next).

``open_checkpoint(path)`` splits a checkpoint path into the storage that holds it and its name.
"""

from __future__ import annotations

import errno
import os

from ..errors import StorageError
from .base import Storage
from .local import LocalStorage, storage_error

__all__ = ["Storage", "LocalStorage", "open_checkpoint", "open_root", "storage_error"]


def open_checkpoint(path, storage_options: dict | None = None) -> tuple[Storage, str]:
    """``(storage, name)``: the storage rooted at the checkpoint's parent, and its folder name."""
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        raise StorageError(errno.EPROTONOSUPPORT,
                           f"{text}: object storage URLs are not supported yet (local paths only)")
    text = text[len("file://"):] if text.startswith("file://") else text
    full = os.path.abspath(os.path.expanduser(text)).rstrip(os.sep) or os.sep
    parent, name = os.path.split(full)
    if not name:
        raise ValueError(f"{path!r} is not a checkpoint folder path")
    return LocalStorage(parent), name


def open_root(root, storage_options: dict | None = None) -> Storage:
    """The storage rooted at ``root`` itself: the folder (or prefix) that holds checkpoints."""
    text = os.fspath(root)
    # A checkpoint path one level below the root resolves to exactly the root's storage.
    storage, _ = open_checkpoint(text.rstrip("/") + "/_", storage_options)
    return storage
