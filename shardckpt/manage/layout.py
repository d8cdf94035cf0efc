"""What lies under a manager root: committed checkpoints and the leftovers of interrupted saves,
and the garbage collection of those leftovers (``CheckpointManager.cleanup``, ``shardckpt gc``).

Names follow the manager and the commit strategies: ``step-<8+ digits>`` folders (committed when
they hold a manifest; on object stores an interrupted save leaves one without), and hidden
siblings ``.step-N.tmp-<hex>`` (a save before its rename), ``.step-N.old-<hex>`` (a replaced
checkpoint moved aside), ``.step-N.deleting-<hex>`` (retention removing one) and
``.step-N.demote-<hex>`` (a demotion's new manifest before its rename), plus the
manager's ``.latest.tmp-<hex>`` (and of its root files, ``.lease.tmp-<hex>``,
``.manager.tmp-<hex>``). A step folder this process cannot read (permissions, a file in its
place) is ``unreadable``: it may hold a committed checkpoint, so it is reported and kept.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass

from ..format import retire
from ..format.root import is_committed
from ..errors import CheckpointError
from ..storage import Storage, storage_error
from ..types import DATA_DIR, MANIFEST_NAME

STEP_NAME = re.compile(r"step-(\d{8,})")
LATEST_NAME = "latest"
HIDDEN = re.compile(r"\.step-(\d{8,})\.(tmp|old|deleting|demote)-[0-9a-f]+")
LATEST_TMP = re.compile(r"\.latest\.tmp-[0-9a-f]+")
ROOT_FILE_TMP = re.compile(r"\.(lease|manager)\.tmp-[0-9a-f]+")  # root.py and lease.py


def step_name(step: int) -> str:
    """The folder name of a step's checkpoint; sorts by step as text too."""
    if step < 0:
        raise ValueError(f"step must be >= 0, not {step}")
    return f"step-{step:08d}"


def replace_file(storage: Storage, name: str, data: bytes, stem: str, tries: int = 3) -> None:
    """Replace the small root file ``name`` (``latest``, the lease, the manager's settings) so
    that readers see the old bytes or the new, never a part: on disks a temporary
    ``.<stem>.tmp-<hex>`` renamed over it, on object stores one whole-object write. A temporary
    that ``gc`` removed before its rename (a short ``--older-than``) is written again.

    Raises:
        StorageError (DiskFullError, StoragePermissionError...): naming ``name``.
    """
    if not storage.atomic_rename:
        try:
            storage.write(name, data, durable=True, exclusive=False)
        except OSError as exc:
            raise exc if isinstance(exc, CheckpointError) else \
                storage_error(exc, f"writing {storage.url(name)}") from exc
        return
    for attempt in range(tries):
        tmp = f".{stem}.tmp-{secrets.token_hex(4)}"
        try:
            storage.write(tmp, data, durable=True)
            storage.rename(tmp, name)
            return
        except FileNotFoundError:
            if attempt + 1 < tries:
                continue  # the temporary was collected before its rename: write it again
            raise CheckpointError(f"{storage.url(name)}: its temporary was removed {tries} "
                                  "times before it could be renamed (gc running with "
                                  "--older-than near 0?)") from None
        except OSError as exc:
            _discard(storage, tmp)
            raise exc if isinstance(exc, CheckpointError) else \
                storage_error(exc, f"writing {storage.url(name)}") from exc


def _discard(storage: Storage, name: str) -> None:
    try:
        storage.delete(name)
    except OSError:
        pass  # a leftover temporary that gc collects later


@dataclass(frozen=True)
class RootEntry:
    """One name under the root.

    Attributes:
        kind: ``committed``, ``uncommitted`` (a step folder without a manifest), ``retired``
            (deleted, but newer checkpoints reference some of its files: retire.py),
            ``unreadable`` (this process cannot look inside: ``error`` says why), ``tmp``,
            ``old``, ``deleting``, ``demote`` (a demotion's manifest before its rename:
            format/demote.py), ``latest-tmp``, ``lease-tmp`` or ``manager-tmp``.
        error: for ``unreadable``, the OS's reason.
    """

    name: str
    step: int | None
    kind: str
    error: str | None = None

    @property
    def committed(self) -> bool:
        return self.kind == "committed"


def entries(storage: Storage) -> list[RootEntry]:
    """Every checkpoint and leftover under the root, by step then name."""
    found = []
    for name in storage.list(""):
        if match := STEP_NAME.fullmatch(name):
            found.append(_step_entry(storage, name, int(match.group(1))))
        elif match := HIDDEN.fullmatch(name):
            found.append(RootEntry(name, int(match.group(1)), match.group(2)))
        elif LATEST_TMP.fullmatch(name):
            found.append(RootEntry(name, None, "latest-tmp"))
        elif match := ROOT_FILE_TMP.fullmatch(name):
            found.append(RootEntry(name, None, f"{match.group(1)}-tmp"))
    return sorted(found, key=lambda e: (e.step if e.step is not None else -1, e.name))


def _step_entry(storage: Storage, name: str, step: int) -> RootEntry:
    """A step folder's entry. Not seeing a manifest means "never committed" only when the
    folder can be read: mode 000, or a file in its place, hides one as well."""
    if is_committed(storage, name):
        return RootEntry(name, step, "committed")
    if retire.is_retired(storage, name):
        return RootEntry(name, step, "retired")
    try:
        storage.list(name)
        if storage.local_path(name):  # a folder listed but not searchable (mode r--)
            os.lstat(os.path.join(storage.local_path(name), MANIFEST_NAME))
    except FileNotFoundError:
        pass
    except OSError as exc:
        return RootEntry(name, step, "unreadable", f"{exc.strerror or exc}")
    return RootEntry(name, step, "uncommitted")


def _files(storage: Storage, name: str) -> list[str]:
    """The files a checkpoint folder may hold (FORMAT.md: a manifest and ``data/*``); for a
    plain file, itself. Listing by the known layout keeps this to two list calls on any store.
    What cannot be listed (gone meanwhile, no permission) adds nothing."""
    try:
        storage.list(name)
    except NotADirectoryError:
        return [name]  # a file: the manager's .latest.tmp
    except OSError:
        return []
    try:
        files = [f"{name}/{DATA_DIR}/{f}" for f in storage.list(f"{name}/{DATA_DIR}")]
    except OSError:
        files = []
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
    times = []
    for p in [name, f"{name}/{DATA_DIR}"] + _files(storage, name):
        try:
            times.append(storage.modified(p))
        except OSError:  # gone or unreadable meanwhile: tells nothing
            pass
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _verdict(storage: Storage, entry: RootEntry, committed: set, older_than: float,
             now: float) -> tuple[bool, str, float | None]:
    """``(remove?, why, age in seconds)`` for one leftover."""
    changed = last_activity(storage, entry.name)
    age = None if changed is None else max(0.0, now - changed)
    if entry.kind == "old" and entry.step not in committed:
        return False, f"only copy of step {entry.step}: rename it to step-{entry.step:08d}", age
    if older_than > 0 and age is None:
        return False, "age unknown (the storage has no modification times)", age
    if age is not None and age < older_than:
        return False, f"younger than {older_than:g}s: a save may still be writing it", age
    return True, "leftover of an interrupted save", age


def _sweep_retired(storage: Storage, entry: RootEntry, dry_run: bool, removed: list,
                   kept: list) -> None:
    """A retired folder: its files no committed checkpoint references go (retire.sweep)."""
    held, users = retire.held_files(storage, entry.name)
    row = {"name": entry.name, "kind": "retired", "step": entry.step,
           "bytes": folder_bytes(storage, entry.name), "age_seconds": None}
    if held:
        row["reason"] = f"files referenced by {', '.join(users[:3])}"
        if not dry_run and held is not retire.ALL:
            retire.sweep(storage, entry.name)
        kept.append(row)
    else:
        row["reason"] = "retired and no longer referenced"
        if not dry_run:
            retire.sweep(storage, entry.name)
        removed.append(row)


def collect_garbage(storage: Storage, older_than: float = 3600.0,
                    dry_run: bool = False) -> tuple[list[dict], list[dict]]:
    """Remove (unless ``dry_run``) the leftovers of interrupted saves under a manager root.

    A committed checkpoint is never touched, and a step folder is checked again right before its
    removal. Leftovers younger than ``older_than`` seconds may belong to a save still running and
    are kept, as is one whose age the storage cannot tell. A ``.old-*`` folder is the only copy
    of a checkpoint when a crash came between moving it aside and renaming its replacement in:
    it is kept while no committed ``step-N`` exists.

    Returns:
        ``(removed, kept)``: a row per leftover with ``name``, ``kind``, ``step``, ``bytes``,
        ``age_seconds`` and ``reason``.
    """
    found = entries(storage)
    committed = {e.step for e in found if e.committed}
    now, removed, kept = time.time(), [], []
    for entry in found:
        try:
            _collect_one(storage, entry, committed, older_than, now, dry_run, removed, kept)
        except (OSError, CheckpointError) as exc:
            # One folder that vanished (retention removed it meanwhile) or cannot be read must
            # not stop the collection of the others: report it and go on.
            gone = isinstance(exc, FileNotFoundError) and not storage.exists(entry.name)
            kept.append({"name": entry.name, "kind": entry.kind, "step": entry.step,
                         "bytes": 0 if gone else None, "age_seconds": None,
                         "reason": "removed meanwhile by another process" if gone else
                         f"cannot be collected: {type(exc).__name__}: {exc}"})
    return removed, kept


def _collect_one(storage: Storage, entry: RootEntry, committed: set, older_than: float,
                 now: float, dry_run: bool, removed: list, kept: list) -> None:
    """Decide on, and remove unless ``dry_run``, one entry of the root."""
    if entry.kind == "retired":
        _sweep_retired(storage, entry, dry_run, removed, kept)
        return
    if entry.kind == "unreadable":  # may hold a committed checkpoint this process cannot see
        kept.append({"name": entry.name, "kind": entry.kind, "step": entry.step,
                     "bytes": None, "age_seconds": None,
                     "reason": f"cannot be read ({entry.error}); not removed"})
        return
    if not entry.committed:
        remove, why, age = _verdict(storage, entry, committed, older_than, now)
        row = {"name": entry.name, "kind": entry.kind, "step": entry.step,
               "bytes": folder_bytes(storage, entry.name), "age_seconds": age, "reason": why}
        # A step folder may have been committed since it was listed: check at the last moment.
        if remove and entry.kind == "uncommitted" and is_committed(storage, entry.name):
            remove, row["reason"] = False, "committed meanwhile"
        if remove and not dry_run:
            storage.delete(entry.name)
            if storage.exists(entry.name):  # delete ignores what it cannot remove (EROFS)
                remove, row["reason"] = False, "could not be removed (read-only, permissions?)"
        (removed if remove else kept).append(row)
