"""A root's committed checkpoints, the markers of saves in progress or deletions, and the
leftovers of saves that never committed."""

from __future__ import annotations

import re

from ..errors import CheckpointError
from ..storage import Storage
from ..types import DATA_DIR, MANIFEST_NAME


TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
DELETE_MARK = ".deleting-"  # a checkpoint renamed out of sight to be deleted (manager)


def is_committed(storage: Storage, name: str, validate: bool = False) -> bool:
    """Whether ``name`` holds a committed checkpoint: its manifest exists (and with
    ``validate``, parses and passes its checks)."""
    rel = f"{name}/{MANIFEST_NAME}"
    if not validate:
        return storage.exists(rel)
    from . import manifest as manifest_mod
    try:
        manifest_mod.parse(storage.read(rel))
    except (FileNotFoundError, CheckpointError):
        return False
    return True


def list_checkpoints(storage: Storage, validate: bool = False) -> list[str]:
    """Names of the committed checkpoints directly under the storage's root, sorted."""
    return [n for n in storage.list("") if not n.startswith(".")
            and is_committed(storage, n, validate)]


def leftovers(storage: Storage) -> list[str]:
    """What interrupted saves left under the storage's root: hidden temporary or set-aside
    folders of ``RenameCommit``, and prefixes holding data but no manifest (``MarkerCommit``).
    Only call it while no save is running there: a save in flight looks the same."""
    found = []
    for n in storage.list(""):
        if n.startswith(".") and (TMP_MARK in n or OLD_MARK in n or DELETE_MARK in n):
            found.append(n)
        elif not n.startswith(".") and _is_debris(storage, n):
            found.append(n)
    return found


def _is_debris(storage: Storage, name: str) -> bool:
    try:
        entries = storage.list(name)
    except NotADirectoryError:  # a plain file (a manager's ``latest``): no save made it
        return False
    return DATA_DIR in entries and set(entries) <= {DATA_DIR, MANIFEST_NAME} \
        and not is_committed(storage, name)


def remove_leftovers(storage: Storage, names: list[str] | None = None) -> list[str]:
    """Delete ``names`` (default: everything ``leftovers`` finds); returns what was deleted.

    A set-aside ``.<name>.old-*`` folder is kept while ``name`` has no committed checkpoint: a
    crash between moving the old checkpoint aside and renaming its replacement in leaves it as
    the only copy. (``shardckpt.manage.layout.collect_garbage`` does the same for manager roots, and
    also spares leftovers young enough to belong to a running save.)"""
    names = leftovers(storage) if names is None else names
    removed = []
    for n in names:
        if n.startswith(".") and OLD_MARK in n and \
                not is_committed(storage, n[1:n.index(OLD_MARK)]):
            continue
        storage.delete(n)
        removed.append(n)
    return removed


_DATA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.(bin|idx)")  # data and index files


def foreign_entry(storage: Storage, name: str) -> str | None:
    """The first path under ``name`` that no checkpoint consists of (FORMAT.md 1: only
    ``manifest.json``, ``data/<file>.bin`` and ``data/<file>.idx``), or None. A save never
    deletes such a file, overwriting or not: it may be the user's ``config.yaml``."""
    for entry in storage.list(name):
        if entry == DATA_DIR:
            for sub in storage.list(f"{name}/{DATA_DIR}"):
                if not _DATA_NAME.fullmatch(sub):
                    return f"{name}/{DATA_DIR}/{sub}"
        elif entry != MANIFEST_NAME:
            return f"{name}/{entry}"
    return None
