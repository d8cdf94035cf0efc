"""Deleting checkpoints that others reference, and copying one out of its root.

An incremental checkpoint's manifest names data files of earlier checkpoints under the same root
(FORMAT.md 3.6). Deleting such an earlier checkpoint must keep those files, and a crash at any
moment must leave every kept checkpoint loadable. The protocol (FORMAT.md 3.6.3):

1. **Retire.** The checkpoint stops being one: locally ``manifest.json`` is renamed to
   ``retired.json`` (atomic); on object stores ``retired.json`` is written first, then
   ``manifest.json`` deleted. A retired folder is listed by no tool as a checkpoint, and by
   ``layout`` as ``retired`` (never as a leftover to delete).
2. **Sweep.** The files of a retired folder that no committed checkpoint references are deleted,
   one by one; once none is referenced the whole folder goes (renamed out of sight first).

Only files no committed manifest names are ever deleted, so each step may be interrupted and
redone. A checkpoint nobody references is deleted as before, without retiring.
"""

from __future__ import annotations

import secrets

from .root import DELETE_MARK, is_committed, list_checkpoints
from ..errors import CheckpointError, CheckpointExistsError
from .opening import open_manifest
from ..types import DATA_DIR, MANIFEST_NAME

RETIRED_NAME = "retired.json"
ALL = object()  # "every file": a committed manifest could not be read, so keep everything


def is_retired(storage, name: str) -> bool:
    """Whether ``name`` is a retired checkpoint folder (step 1 done, its files still held)."""
    return storage.exists(f"{name}/{RETIRED_NAME}")


def held_files(storage, name: str, skip: str | None = None):
    """Paths (``data/...``) of ``name``'s files that committed checkpoints other than ``name``
    and ``skip`` reference, with the names of those checkpoints; ``(ALL, [...])`` when some
    committed manifest cannot be read (it might reference anything)."""
    held, users = set(), []
    for other in list_checkpoints(storage):
        if other in (name, skip):
            continue
        try:
            m = open_manifest(storage, other)
        except CheckpointError:
            if not is_committed(storage, other):
                continue  # removed meanwhile (retention, another gc): it references nothing
            return ALL, [other]
        mine = {f.path for f in m.files if f.base == name}
        if mine:
            held |= mine
            users.append(other)
    return held, users


def _drop_folder(storage, name: str) -> None:
    """Delete a folder so that it is never seen half-deleted (the manager's removal)."""
    if storage.atomic_rename:
        hidden = f".{name}{DELETE_MARK}{secrets.token_hex(4)}"
        try:
            storage.rename(name, hidden)
        except FileNotFoundError:  # another sweep (retention, gc) dropped it meanwhile
            return
        storage.delete(hidden)
    else:
        storage.delete(f"{name}/{MANIFEST_NAME}")
        storage.delete(name)


def retire(storage, name: str) -> None:
    """Step 1: ``name`` stops being a committed checkpoint but keeps its files."""
    if storage.atomic_rename:
        storage.rename(f"{name}/{MANIFEST_NAME}", f"{name}/{RETIRED_NAME}")
        storage.sync_dir(name)
    else:
        storage.write(f"{name}/{RETIRED_NAME}", storage.read(f"{name}/{MANIFEST_NAME}"),
                      durable=True, exclusive=False)
        storage.delete(f"{name}/{MANIFEST_NAME}")


def sweep(storage, name: str) -> list[str]:
    """Step 2 for a retired folder: delete what no committed checkpoint references; the
    folder itself once nothing is. Returns what was deleted."""
    held, _ = held_files(storage, name)
    if held is ALL:
        return []
    if not held:
        _drop_folder(storage, name)
        return [name]
    gone = []
    for f in storage.list(f"{name}/{DATA_DIR}"):
        if f"{DATA_DIR}/{f}" not in held:
            storage.delete(f"{name}/{DATA_DIR}/{f}")
            gone.append(f"{name}/{DATA_DIR}/{f}")
    return gone


def remove_checkpoint(storage, name: str) -> None:
    """Delete checkpoint ``name``: at once when no committed checkpoint references its files,
    else retire it and sweep what is not referenced (the rest goes with its last user)."""
    if is_committed(storage, name) and not is_retired(storage, name):
        held, _ = held_files(storage, name)
        if not held:
            _drop_folder(storage, name)
            return
        retire(storage, name)
    elif is_committed(storage, name):  # a retire that a crash interrupted on an object store
        storage.delete(f"{name}/{MANIFEST_NAME}")
    sweep(storage, name)


def sweep_all(storage) -> list[str]:
    """Sweep every retired folder of the root (after deletions, and from ``gc``)."""
    gone = []
    for name in storage.list(""):
        if not name.startswith(".") and not is_committed(storage, name) \
                and is_retired(storage, name):
            gone += sweep(storage, name)
    return gone


def check_replaceable(storage, name: str) -> None:
    """Refuse to overwrite ``name`` while committed checkpoints reference its files (the new
    files would take their names). Raises CheckpointExistsError naming them."""
    if not storage.exists(name):
        return
    held, users = held_files(storage, name)
    if held:
        raise CheckpointExistsError(
            f"{storage.url(name)}: checkpoints {users[:5]} reference its data files; delete "
            "them first or save under another name")
