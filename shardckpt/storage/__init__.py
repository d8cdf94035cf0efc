"""Where checkpoints live: one ``Storage`` interface; local disks and any fsspec file system.

``open_checkpoint(path, storage_options)`` splits a checkpoint path or URL into the storage that
holds it (rooted at the parent) and the checkpoint's name. Object stores come wrapped in
retries (retry.py). Tests may add wrappers (``shardckpt.testing.faulty_storage``) through
``WRAPPERS``: each is applied to every storage opened, beneath the retries.
"""

from __future__ import annotations

import errno
import os
from typing import Callable

from ..errors import StorageError
from .base import Storage
from .local import LocalStorage, storage_error
from .retry import RetryingStorage, with_retries

__all__ = ["Storage", "LocalStorage", "RetryingStorage", "open_checkpoint", "open_storage",
           "storage_error", "WRAPPERS"]

#: Functions ``Storage -> Storage`` applied to every storage opened (test fault injection).
WRAPPERS: list[Callable[[Storage], Storage]] = []


def _split(text: str, path) -> tuple[str, str]:
    parent, _, name = text.rstrip("/").rpartition("/")
    if not name or not parent:
        raise ValueError(f"{path!r} is not a checkpoint folder path")
    return parent, name


def _fsspec_storage(url: str, storage_options: dict | None) -> Storage:
    try:
        import fsspec
    except ImportError:
        raise StorageError(errno.EPROTONOSUPPORT, f"{url}: object storage needs fsspec "
                           "(pip install 'shardckpt[fsspec]', or [s3])") from None
    protocol = url.split("://", 1)[0]
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        # Other ranks and other saves change the bucket: never answer from a stale listing.
        options.setdefault("use_listings_cache", False)
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise StorageError(errno.EPROTONOSUPPORT, f"{url}: {exc}") from exc
    if protocol in ("s3", "s3a"):
        from .s3 import S3Storage
        return S3Storage(fs, root, protocol)
    from .fsspec_store import FsspecStorage
    return FsspecStorage(fs, root, protocol)


def open_storage(url, storage_options: dict | None = None) -> Storage:
    """The storage rooted at a folder path or fsspec URL (``s3://``, ``gs://``, ``az://``,
    ``memory://``, ``file://``); ``storage_options`` go to fsspec."""
    text = os.fspath(url)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        storage = _fsspec_storage(text, storage_options)
    else:
        storage = LocalStorage(os.path.abspath(os.path.expanduser(text)))
    for wrap in WRAPPERS:
        storage = wrap(storage)
    return with_retries(storage)


def open_checkpoint(path, storage_options: dict | None = None) -> tuple[Storage, str]:
    """``(storage, name)``: the storage rooted at the checkpoint's parent, and its name."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" not in text:
        text = os.path.abspath(os.path.expanduser(text)).rstrip(os.sep) or os.sep
        parent, name = os.path.split(text)
        if not name:
            raise ValueError(f"{path!r} is not a checkpoint folder path")
        return open_storage(parent, storage_options), name
    parent, name = _split(text, path)
    if parent.endswith(":/"):  # "memory://name": the store's root holds the checkpoint
        parent += "/"
    return open_storage(parent, storage_options), name
