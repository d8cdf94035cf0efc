"""What lies under a manager root: committed checkpoints and the leftovers of interrupted saves.

Names follow the manager and the commit strategies: ``step-<8+ digits>`` folders (committed when
they hold a manifest; on object stores an interrupted save leaves one without), and hidden
siblings ``.step-N.tmp-<hex>`` (a save before its rename), ``.step-N.old-<hex>`` (a replaced
checkpoint moved aside) and ``.step-N.deleting-<hex>`` (retention removing one), plus the
manager's ``.latest.tmp-<hex>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..commit import is_committed
from ..manager import STEP_NAME
from ..storage import Storage
from ..types import DATA_DIR, MANIFEST_NAME

HIDDEN = re.compile(r"\.step-(\d{8,})\.(tmp|old|deleting)-[0-9a-f]+")
LATEST_TMP = re.compile(r"\.latest\.tmp-[0-9a-f]+")


@dataclass(frozen=True)
class RootEntry:
    """One name under the root.

    Attributes:
        kind: ``committed``, ``uncommitted`` (a step folder without a manifest), ``tmp``,
            ``old``, ``deleting`` or ``latest-tmp``.
    """

    name: str
    step: int | None
    kind: str

    @property
    def committed(self) -> bool:
        return self.kind == "committed"


def entries(storage: Storage) -> list[RootEntry]:
    """Every checkpoint and leftover under the root, by step then name."""
    found = []
    for name in storage.list(""):
        if match := STEP_NAME.fullmatch(name):
            kind = "committed" if is_committed(storage, name) else "uncommitted"
            found.append(RootEntry(name, int(match.group(1)), kind))
        elif match := HIDDEN.fullmatch(name):
            found.append(RootEntry(name, int(match.group(1)), match.group(2)))
        elif LATEST_TMP.fullmatch(name):
            found.append(RootEntry(name, None, "latest-tmp"))
    return sorted(found, key=lambda e: (e.step if e.step is not None else -1, e.name))


def _files(storage: Storage, name: str) -> list[str]:
    """The files a checkpoint folder may hold (FORMAT.md: a manifest and ``data/*``); for a
    plain file, itself. Listing by the known layout keeps this to two list calls on any store."""
    try:
        storage.list(name)
    except NotADirectoryError:
        return [name]  # a file: the manager's .latest.tmp
    files = [f"{name}/{DATA_DIR}/{f}" for f in storage.list(f"{name}/{DATA_DIR}")]
    if storage.exists(f"{name}/{MANIFEST_NAME}"):
        files.append(f"{name}/{MANIFEST_NAME}")
    return files


def folder_bytes(storage: Storage, name: str) -> int:
    """Bytes stored under ``name`` (files that vanish meanwhile count as 0)."""
    total = 0
    for f in _files(storage, name):
        try:
            total += storage.size(f)
        except OSError:
            pass
    return total


def last_activity(storage: Storage, name: str) -> float | None:
    """The newest modification time of ``name``, its data folder and its files (a save in
    progress keeps touching them); None when the storage cannot tell."""
    times = [storage.modified(p) for p in [name, f"{name}/{DATA_DIR}"] + _files(storage, name)]
    known = [t for t in times if t is not None]
    return max(known) if known else None
