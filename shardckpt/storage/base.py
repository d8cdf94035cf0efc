"""The one storage interface every backend implements.

A ``Storage`` is rooted at the folder (or key prefix) that *holds* checkpoints; every path it takes
is relative to that root, with ``/`` separators. The save path calls, in order: ``makedirs`` /
``write`` (or native IO on ``local_path``) for data, ``write`` of the manifest, then the commit
strategy (``shardckpt.save.commit``) that uses ``rename`` where ``atomic_rename`` is true and the
manifest-last marker otherwise. The load path calls ``read`` and ``size``; ``local_path`` lets the
native core do its own ranged IO on local disks. Stores with no local path receive data files
through ``write``, or where ``multipart_min_bytes`` is set through the multipart calls
(``begin_upload`` -> ``upload_part``, any number, concurrently -> ``complete_upload``, or
``abort_upload`` on failure), driven by ``shardckpt.save.upload``.
"""

from __future__ import annotations

import abc


class Storage(abc.ABC):
    """Capabilities are class attributes so planners can ask before they act."""

    #: ``rename`` of a directory is atomic (local POSIX file systems).
    atomic_rename: bool = False
    #: Smallest part (but the last) of a multipart upload; 0: the store has no multipart upload.
    multipart_min_bytes: int = 0

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file or folder exists at ``path``."""

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Byte size of a file. Raises FileNotFoundError."""

    @abc.abstractmethod
    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes at ``offset`` (all when None). Raises FileNotFoundError."""

    @abc.abstractmethod
    def write(self, path: str, data: bytes, durable: bool = True, exclusive: bool = True) -> None:
        """Create ``path`` holding ``data``; with ``durable`` it survives a crash on return.

        With ``exclusive`` an existing ``path`` raises FileExistsError (create-if-absent; atomic
        where the store supports it), otherwise it is replaced."""

    @abc.abstractmethod
    def makedirs(self, path: str) -> None:
        """Create a folder and its parents (a no-op on stores without folders)."""

    @abc.abstractmethod
    def list(self, path: str = "") -> list[str]:
        """Names directly under ``path``, sorted."""

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Remove a file or a whole folder; missing is fine."""

    def url(self, path: str) -> str:
        """How to name ``path`` to a person (a file path or an fsspec URL)."""
        return self.local_path(path) or path

    def local_path(self, path: str) -> str | None:
        """A real file-system path for native IO, or None for remote stores."""
        return None

    def modified(self, path: str) -> float | None:
        """When ``path`` (a file or folder) last changed, in Unix seconds; None when it is
        missing or the backend cannot tell (``gc`` then treats it as possibly in use)."""
        return None

    def rename(self, src: str, dst: str, exchange: bool = False) -> None:
        """Atomically rename (or with ``exchange``, swap) two folders; only if atomic_rename."""
        raise NotImplementedError(f"{type(self).__name__} has no atomic rename")

    def sync_dir(self, path: str) -> None:
        """Make the entries of a folder durable (fsync of the folder where that exists)."""

    def begin_upload(self, path: str) -> str:
        """Start a multipart upload to ``path``; returns its id. Only if multipart_min_bytes."""
        raise NotImplementedError(f"{type(self).__name__} has no multipart upload")

    def upload_part(self, path: str, upload_id: str, number: int, data) -> str:
        """Upload part ``number`` (from 1) of an upload; returns its tag for complete_upload."""
        raise NotImplementedError(f"{type(self).__name__} has no multipart upload")

    def complete_upload(self, path: str, upload_id: str, tags: list[str]) -> None:
        """Make the object from parts 1..len(tags), in order."""
        raise NotImplementedError(f"{type(self).__name__} has no multipart upload")

    def abort_upload(self, path: str, upload_id: str) -> None:
        """Drop an unfinished upload and its parts."""
        raise NotImplementedError(f"{type(self).__name__} has no multipart upload")
