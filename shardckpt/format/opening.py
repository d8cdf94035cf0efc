"""Open a checkpoint as untrusted input: its manifest (bounded, CRC-checked, every FORMAT.md
rule), its index files, and its data files or objects, each checked for place, type and size
before any read."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from . import chunk_index, manifest as manifest_mod
from .. import knobs
from ..errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError,
                      IncompleteCheckpointError, UnsafeCheckpointError)
from ..storage import Storage, open_checkpoint, storage_error
from ..types import FILE_HEADER, HEADER_BYTES, MANIFEST_NAME, FileEntry, Manifest


def open_manifest(storage: Storage, name: str) -> Manifest:
    """The checkpoint's parsed, validated manifest."""
    return checked_manifest(storage, name, manifest_bytes(storage, name))


def manifest_bytes(storage: Storage, name: str) -> bytes:
    """The checkpoint's manifest bytes, bounded in size, unchecked (``checked_manifest``). For a
    revision 1.4 manifest, the bytes of its index files follow in one framed blob
    (chunk_index.bundle): whoever fetches this once (share.py: one rank, then a broadcast)
    hands every rank all it needs to open the checkpoint."""
    where = storage.url(name)
    with reading(f"{where}: the checkpoint folder",
                 lambda: CheckpointNotFoundError(f"{where}: removed while being opened")):
        if not storage.exists(name) and _absent(storage, name):
            raise CheckpointNotFoundError(f"{where}: no checkpoint here")
        local = storage.local_path(name)
        if local is not None and not os.path.exists(local):  # lexists, not exists: a link
            raise CheckpointNotFoundError(f"{where}: a symbolic link to nothing")
    rel = f"{name}/{MANIFEST_NAME}"
    with reading(f"{where}/{MANIFEST_NAME}", lambda: IncompleteCheckpointError(
            f"{where}/{MANIFEST_NAME}: removed while being opened (retention or gc)")):
        if not storage.exists(rel) and _absent(storage, rel):
            raise IncompleteCheckpointError(f"{where}: no {MANIFEST_NAME}; the save that made "
                                            "this folder never committed")
        if storage.local_path(rel):
            check_inside(storage.local_path(name), MANIFEST_NAME)
        if storage.size(rel) > manifest_mod.MAX_MANIFEST_BYTES:
            raise UnsafeCheckpointError(f"{where}/{MANIFEST_NAME} is larger than 1 GiB")
        # Bounded even if the file grows after the size check.
        data = storage.read(rel, 0, manifest_mod.MAX_MANIFEST_BYTES + 1)
    if b'"indexes":' not in data:  # no revision 1.4 index files (cheap test, no parse)
        return data
    m = manifest_mod.parse(data, _on_disk(storage, name))  # for its indexes; receivers
    # check everything again
    if m.indexes is None:
        return data
    return chunk_index.bundle(data, [_index_bytes(storage, name, e) for e in m.indexes])


@contextlib.contextmanager
def reading(label: str, missing: Callable[[], CheckpointError] | None = None):
    """Turn an OSError met while opening ``label`` into a typed error naming it: ``missing()``
    for a file that is not there (when given), else StorageError or its subclass that also is
    the stdlib type (PermissionError for mode 000, NotADirectoryError for a file where a folder
    belongs; OSError for a symbolic link loop)."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError as exc:
        if missing is None:
            raise storage_error(exc, label) from exc
        raise missing() from exc
    except OSError as exc:
        raise storage_error(exc, label) from exc


def _absent(storage: Storage, rel: str) -> bool:
    """Whether ``rel``, which ``storage.exists`` does not see, is truly absent. On a local disk
    ``exists`` is also false when a folder on the way cannot be searched (mode 000), is a file,
    or loops; an lstat raises the real reason, which ``reading`` types."""
    local = storage.local_path(rel)
    if local is None:
        return True
    try:
        os.lstat(local)
    except FileNotFoundError:
        return True
    return False


def checked_manifest(storage: Storage, name: str, data: bytes) -> Manifest:
    """Manifest bytes of checkpoint ``name`` parsed and validated (FORMAT.md 3); a revision 1.4
    manifest gets its chunk rows joined from its index files (FORMAT.md 3.7), checked alike."""
    data, fetched = chunk_index.unbundle(data)
    m = manifest_mod.parse(data, _on_disk(storage, name))
    if any(f.base == name for f in m.files):
        raise UnsafeCheckpointError(f"{storage.url(name)}/{MANIFEST_NAME}: a file names its own "
                                    "checkpoint as its base")
    m = dataclasses.replace(m, name=name)
    if m.indexes is not None:
        if fetched is not None and len(fetched) != len(m.indexes):
            raise CorruptCheckpointError("manifest bundle lacks index files",
                                         file=MANIFEST_NAME)
        m = chunk_index.join(m, lambda i, entry: fetched[i] if fetched is not None
                             else _index_bytes(storage, name, entry),
                             _on_disk(storage, name), len(data))
        manifest_mod.check_joined(m)
    return m


def _on_disk(storage: Storage, name: str):
    """``data_bytes`` for the metadata budget (budget.py): the bytes data files store, each
    checked on disk first (a manifest may record any size), asked only for a large manifest. A
    local file counts its allocated blocks: a sparse file's holes are no bytes on disk."""
    def total(files) -> int:
        root = storage.local_path(name)
        if root is None:
            for f in files:
                check_object(storage, name, f)
            return sum(f.size for f in files)
        return sum(min(f.size, getattr(os.stat(check_data_file(root, f)), "st_blocks", 1 << 62)
                       * 512) for f in files)
    return total


def _index_bytes(storage: Storage, name: str, entry) -> bytes:
    """An index file's bytes, read inside the checkpoint and bounded by its recorded size."""
    root = storage.local_path(name)
    if root is not None:
        check_inside(root, entry.path)
    with reading(f"{storage.url(name)}/{entry.path}", lambda: CorruptCheckpointError(
            "chunk index file is missing", file=entry.path)):
        return storage.read(f"{name}/{entry.path}", 0, entry.size + 1)


def file_label(m: Manifest, f: FileEntry) -> str:
    """How messages name data file ``f`` of ``m``: its path, and for a reference the
    checkpoint that stores it and the one that references it (FORMAT.md 3.6)."""
    if f.base is None:
        return f.path
    return f"{f.location} (stored by checkpoint {f.base!r}, referenced by {m.name!r})"


def check_inside(root: str, rel: str, label: str | None = None) -> str:
    """The real path of ``rel`` under ``root``; refuses one that resolves outside it (a symbolic
    link) or that is not a regular file (a FIFO or device would block or never end). ``root`` is
    the checkpoint, or for a referenced file (``label`` names it) the root holding both."""
    root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, rel))
    where = "the checkpoint" if label is None else "the checkpoints' root"
    if os.path.commonpath([root, real]) != root:
        raise UnsafeCheckpointError(f"{label or rel} resolves outside {where} ({real})")
    if os.path.exists(real) and not stat.S_ISREG(os.stat(real).st_mode):
        raise UnsafeCheckpointError(f"{label or rel} is not a regular file")
    return real


def data_paths(storage: Storage, name: str, m: Manifest) -> list[str]:
    """Real paths of the data files, each checked to lie inside the checkpoint and to have the
    size the manifest records. Every path is checked before any data file is opened."""
    root, parent = storage.local_path(name), storage.local_path("")
    paths = [check_inside(root, f.path) if f.base is None else
             check_inside(parent, f.location, file_label(m, f)) for f in m.files]
    return [_check_file(real, f, file_label(m, f)) for f, real in zip(m.files, paths)]


def check_data_file(root: str, f: FileEntry) -> str:
    """The real path of data file ``f`` of the checkpoint folder ``root``, after checking that it
    lies inside the checkpoint, is a regular file, and has the manifest's size and the format's
    header.

    Raises:
        UnsafeCheckpointError: the path resolves outside the checkpoint or is no regular file.
        CorruptCheckpointError: the file is missing, has another size, or a foreign header.
    """
    if f.base is not None:  # a reference: the file lives in the sibling checkpoint f.base
        parent = os.path.dirname(os.path.realpath(root))
        return _check_file(check_inside(parent, f.location, f.location), f, f.location)
    return _check_file(check_inside(root, f.path), f)


def _check_file(real: str, f: FileEntry, label: str | None = None) -> str:
    label = label or f.path
    with reading(f"data file {label} ({real})",
                 lambda: CorruptCheckpointError("data file is missing", file=label)):
        size = os.stat(real).st_size
        if size != f.size:
            raise CorruptCheckpointError(f"data file has {size} bytes, the manifest says "
                                         f"{f.size} (truncated or overwritten)", file=label)
        with open(real, "rb") as fh:
            if fh.read(HEADER_BYTES) != FILE_HEADER:
                raise CorruptCheckpointError("data file header is not SHRDCKPT v1", file=label)
    return real


def open_for_read(path, storage_options: dict | None = None) -> tuple[Manifest, list]:
    """The validated manifest and checked data files of the checkpoint at ``path``: real paths,
    or on object stores ``RemoteFile`` objects."""
    storage, name = open_checkpoint(path, storage_options)
    m = open_manifest(storage, name)
    return m, data_sources(storage, name, m)


def data_sources(storage: Storage, name: str, m: Manifest) -> list:
    """The checked data files of manifest ``m``: real paths, or on object stores
    ``RemoteFile`` objects."""
    if storage.local_path(name) is None:
        return data_objects(storage, name, m)
    return data_paths(storage, name, m)


class LazySources:
    """The data files of manifest ``m`` as ``data_sources`` gives them, each checked on its first
    use, so that a rank of a large job stats and reads the header of only the files it reads.
    Thread-safe (files are read concurrently)."""

    def __init__(self, storage: Storage, name: str, m: Manifest):
        self.storage, self.name, self.m = storage, name, m
        self.root = storage.local_path(name)
        self._checked: dict[int, object] = {}
        self._lock = threading.Lock()

    def __getitem__(self, i: int):
        with self._lock:
            if i not in self._checked:
                f = self.m.files[i]
                self._checked[i] = (check_object(self.storage, self.name, f)
                                    if self.root is None else check_data_file(self.root, f))
            return self._checked[i]


@dataclass(frozen=True)
class RemoteFile:
    """A data file on a store without local paths, as the read plan addresses it."""

    storage: Storage
    path: str  # storage-relative
    rel: str   # checkpoint-relative, for messages


def check_object(storage: Storage, name: str, f) -> RemoteFile:
    """Data file ``f`` of checkpoint ``name``, checked to stay inside the checkpoint and to
    exist with the recorded size and header."""
    if ".." in f.path.split("/"):
        raise UnsafeCheckpointError(f"{f.path}: a data file path leaves the checkpoint")
    rf = RemoteFile(storage, f"{name}/{f.path}", f.path) if f.base is None else \
        RemoteFile(storage, f.location, f"{f.location} (stored by checkpoint {f.base!r}, "
                   f"referenced by {name!r})")  # the base name was checked (refs.py)
    try:
        size = storage.size(rf.path)
    except FileNotFoundError:
        raise CorruptCheckpointError("data object is missing", file=rf.rel) from None
    if size != f.size:
        raise CorruptCheckpointError(f"data object has {size} bytes, the manifest says "
                                     f"{f.size} (truncated or overwritten)", file=rf.rel)
    if storage.read(rf.path, 0, HEADER_BYTES) != FILE_HEADER:
        raise CorruptCheckpointError("data file header is not SHRDCKPT v1", file=rf.rel)
    return rf


def data_objects(storage: Storage, name: str, m: Manifest) -> list[RemoteFile]:
    """The manifest's data files, each checked (``check_object``), concurrently."""
    if any(".." in f.path.split("/") for f in m.files):
        raise UnsafeCheckpointError("a data file path leaves the checkpoint")
    with ThreadPoolExecutor(min(max(len(m.files), 1), knobs.get("remote_concurrency"))) as pool:
        return list(pool.map(lambda f: check_object(storage, name, f), m.files))
