"""Atomic commit: a checkpoint appears complete, at once, or not at all (FORMAT.md 4).

Two strategies exist because stores differ. Where a folder rename is atomic (POSIX disks),
``RenameCommit`` writes data and manifest into a hidden sibling ``.<name>.tmp-<random>`` folder,
makes it durable, and renames the folder into place (swapped atomically with
``renameat2(RENAME_EXCHANGE)`` when it replaces an older checkpoint). Object stores have no
rename (and no fsync: an acknowledged object is durable); there ``MarkerCommit`` writes the data
objects in place and the manifest last, create-if-absent, as the commit marker: a prefix is a
checkpoint only once its manifest exists and validates (FORMAT.md 4.2). ``InPlaceCommit`` is
that marker protocol on a disk, made durable, for a caller that asks for it (``in_place``): a
fresh checkpoint's name exists from the start of the save, as a framework that picks the next
free name, or lists the folder, while a background save runs (Lightning's ModelCheckpoint)
needs; a replacement still goes through a temporary folder.

Both strategies can leave debris when a process dies mid-save (a hidden temporary folder, or
data objects without a manifest); ``leftovers`` finds it and ``remove_leftovers`` deletes it.
``commit_for`` picks the strategy a storage supports.
"""

from __future__ import annotations

import errno
import secrets

from ..errors import CheckpointExistsError
from ..format.root import TMP_MARK, foreign_entry, is_committed
from ..storage import Storage, storage_error
from ..types import DATA_DIR, MANIFEST_NAME


def refuse_to_clobber(storage: Storage, name: str, overwrite: bool) -> None:
    """Raise CheckpointExistsError unless a save may go to ``name``: it is missing or an empty
    folder, or (with ``overwrite``) holds only a checkpoint's files (or an interrupted save's).
    Anything else there is named in the error and never deleted."""
    if not storage.exists(name):
        return
    foreign = foreign_entry(storage, name)
    if foreign is not None:
        raise CheckpointExistsError(
            f"{storage.url(foreign)}: not part of a checkpoint; refusing to save into "
            f"{storage.url(name)}, which would delete it (move it away or pick another path)")
    if not overwrite and storage.list(name):
        raise CheckpointExistsError(
            f"{storage.url(name)}: already exists (pass overwrite=True to replace)")


def commit_for(storage: Storage, name: str, overwrite: bool = False, in_place: bool = False):
    """The commit strategy for ``storage``: RenameCommit where rename is atomic, else
    MarkerCommit; with ``in_place``, InPlaceCommit on a disk where ``name`` holds no committed
    checkpoint."""
    if not storage.atomic_rename:
        return MarkerCommit(storage, name, overwrite)
    if in_place and not is_committed(storage, name):
        return InPlaceCommit(storage, name, overwrite)
    return RenameCommit(storage, name, overwrite)


class RenameCommit:
    """One save's temporary folder and its commit. Use as a context manager: leaving the block
    by an exception removes the temporary folder and leaves any previous checkpoint as it was."""

    def __init__(self, storage: Storage, name: str, overwrite: bool = False):
        self.storage, self.name, self.overwrite = storage, name, overwrite
        self.tmp = f".{name}{TMP_MARK}{secrets.token_hex(6)}"
        self.committed = False

    def __enter__(self) -> "RenameCommit":
        return self.begin()

    def begin(self) -> "RenameCommit":
        """Refuse to clobber a checkpoint (unless overwriting) and create the temporary folder."""
        s, name = self.storage, self.name
        refuse_to_clobber(s, name, self.overwrite)
        try:
            s.makedirs(f"{self.tmp}/{DATA_DIR}")
        except OSError as exc:
            raise storage_error(exc, f"creating {self.tmp}") from exc
        return self

    def path(self, rel: str) -> str:
        """Where ``rel`` (checkpoint-relative) is written before the commit."""
        return f"{self.tmp}/{rel}"

    def commit(self, manifest: bytes) -> None:
        """Write the manifest last, make everything durable, then rename into place."""
        s = self.storage
        try:
            s.write(self.path(MANIFEST_NAME), manifest, durable=True)
            s.sync_dir(self.path(DATA_DIR))
            s.sync_dir(self.tmp)
            if s.exists(self.name):
                self._replace()
            else:
                s.rename(self.tmp, self.name)
            s.sync_dir("")
        except OSError as exc:
            raise storage_error(exc, f"committing {self.name}") from exc
        self.committed = True

    def _replace(self) -> None:
        s = self.storage
        try:
            s.rename(self.tmp, self.name, exchange=True)  # tmp now holds the old checkpoint
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
                raise
            # No atomic swap here: move the old one aside first. A crash in between leaves it
            # complete under its hidden name rather than half-replaced.
            aside = f".{self.name}.old-{secrets.token_hex(6)}"
            s.rename(self.name, aside)
            s.rename(self.tmp, self.name)
            self.tmp = aside

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary folder: the failed save's, or after a replacement the old
        checkpoint's. After a plain commit it no longer exists."""
        self.storage.delete(self.tmp)


class InPlaceCommit:
    """A fresh checkpoint written under its final name on a disk, the manifest last.

    Same interface as RenameCommit (``tmp`` is the checkpoint itself). The folder is visible
    from ``begin`` on but is a checkpoint only once its manifest exists (FORMAT.md 1): every
    data file and folder entry is made durable before the manifest is written, so a crash
    leaves data without a manifest (``leftovers`` finds it; a later save to the name clears it),
    never a manifest without its data. A failed save deletes the folder.
    """

    def __init__(self, storage: Storage, name: str, overwrite: bool = False):
        self.storage, self.name, self.overwrite = storage, name, overwrite
        self.tmp = name
        self.committed = False

    def begin(self) -> "InPlaceCommit":
        """Refuse foreign files, clear an interrupted save's debris, create the folder."""
        s, name = self.storage, self.name
        refuse_to_clobber(s, name, overwrite=True)  # no committed checkpoint is there
        try:
            s.delete(name)
            s.makedirs(f"{name}/{DATA_DIR}")
        except OSError as exc:
            raise storage_error(exc, f"creating {name}") from exc
        return self

    def path(self, rel: str) -> str:
        """Where ``rel`` (checkpoint-relative) is written: in place."""
        return f"{self.name}/{rel}"

    def commit(self, manifest: bytes) -> None:
        """Make the data durable, then write the manifest: from then on the checkpoint exists."""
        s = self.storage
        try:
            s.sync_dir(self.path(DATA_DIR))
            s.sync_dir(self.name)
            s.write(self.path(MANIFEST_NAME), manifest, durable=True, exclusive=True)
            s.sync_dir(self.name)
            s.sync_dir("")
        except OSError as exc:
            raise storage_error(exc, f"committing {self.name}") from exc
        self.committed = True

    def __enter__(self) -> "InPlaceCommit":
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        """After a failed save, delete the folder (nothing of it is a checkpoint)."""
        if not self.committed:
            try:
                self.storage.delete(self.name)
            except OSError:
                pass


class MarkerCommit:
    """One save to a store without rename: data objects in place, the manifest last.

    Same interface as RenameCommit (``tmp`` is the checkpoint itself). Overwriting is not
    atomic: ``begin`` first deletes the old manifest (from then on the old checkpoint no longer
    exists) and its data; a failure after that leaves no checkpoint under the name. Debris of an
    interrupted save under the name (data, no manifest) is deleted by ``begin``; any key that is
    not a checkpoint's is refused, overwriting or not. One save per name at a time.
    """

    def __init__(self, storage: Storage, name: str, overwrite: bool = False):
        self.storage, self.name, self.overwrite = storage, name, overwrite
        self.tmp = name
        self.committed = False

    def __enter__(self) -> "MarkerCommit":
        return self.begin()

    def begin(self) -> "MarkerCommit":
        """Refuse to clobber (unless overwriting), then clear the name."""
        s, name = self.storage, self.name
        committed = is_committed(s, name)
        # Debris of an interrupted save (data, no manifest) is cleared without asking.
        refuse_to_clobber(s, name, self.overwrite or not committed)
        if committed:
            s.delete(f"{name}/{MANIFEST_NAME}")  # un-commit before touching its data
        s.delete(name)
        return self

    def path(self, rel: str) -> str:
        """Where ``rel`` (checkpoint-relative) is written: in place."""
        return f"{self.name}/{rel}"

    def commit(self, manifest: bytes) -> None:
        """Write the manifest, create-if-absent: from this moment the checkpoint exists."""
        rel = self.path(MANIFEST_NAME)
        try:
            self.storage.write(rel, manifest, durable=True, exclusive=True)
        except FileExistsError:
            # Our own earlier attempt may have landed before its answer was lost (a retry).
            if self.storage.read(rel) != bytes(manifest):
                raise CheckpointExistsError(f"{self.storage.url(self.name)}: another save "
                                            "committed this checkpoint first") from None
        except OSError as exc:
            raise storage_error(exc, f"committing {self.storage.url(self.name)}") from exc
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        """After a failed save, delete the data objects written so far (best effort: a rank
        still uploading may add more; ``leftovers`` finds those)."""
        if not self.committed:
            try:
                self.storage.delete(self.name)
            except OSError:
                pass
