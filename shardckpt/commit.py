"""Atomic commit: a checkpoint appears complete, at once, or not at all (FORMAT.md 4).

Two strategies exist because stores differ. Where a folder rename is atomic (POSIX disks), data
and manifest are written into a hidden sibling ``.<name>.tmp-<random>`` folder, made durable, and
the folder is renamed into place (swapped atomically with ``renameat2(RENAME_EXCHANGE)`` when it
replaces an older checkpoint). Object stores have no rename; there the manifest, written last, is
the commit marker (comes with the fsspec backend).
"""

from __future__ import annotations

import errno
import secrets

from .errors import CheckpointExistsError
from .storage import Storage, storage_error
from .types import DATA_DIR, MANIFEST_NAME

TMP_MARK = ".tmp-"


def is_committed(storage: Storage, name: str) -> bool:
    return storage.exists(f"{name}/{MANIFEST_NAME}")


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
        if s.exists(name) and not self.overwrite and (is_committed(s, name) or s.list(name)):
            raise CheckpointExistsError(
                f"{s.local_path(name) or name}: already exists (pass overwrite=True to replace)")
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
