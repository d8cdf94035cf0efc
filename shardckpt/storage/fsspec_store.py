"""Any fsspec file system (``memory://``, ``gs://``, ``az://``, ...): no rename, no fsync.

Objects are written whole (``pipe_file``; create-if-absent through fsspec's ``mode="create"``,
atomic where the store supports it) and read by byte range (``cat_file``). There are no real
folders: ``makedirs`` does nothing and a folder exists while an object lies under it. The commit
is therefore the manifest-last marker (commit.MarkerCommit). S3 adds concurrent multipart uploads
in s3.py.
"""

from __future__ import annotations

from datetime import datetime

from .base import Storage

# Where fsspec back ends put an object's modification time (local, S3, memory, GCS, Azure).
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created", "creation_time")


def _seconds(value) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _mtime(info: dict) -> float | None:
    for key in _TIME_KEYS:
        if info.get(key) is not None:
            return _seconds(info[key])
    return None


class FsspecStorage(Storage):
    """A key prefix ``root`` on the fsspec file system ``fs``."""

    atomic_rename = False

    def __init__(self, fs, root: str, protocol: str):
        self.fs, self.root, self.protocol = fs, root.rstrip("/"), protocol

    def _p(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def url(self, path: str) -> str:
        return f"{self.protocol}://{self._p(path).lstrip('/')}"

    def exists(self, path: str) -> bool:
        return self.fs.exists(self._p(path))

    def size(self, path: str) -> int:
        size = self.fs.size(self._p(path))
        if size is None:
            raise FileNotFoundError(self.url(path))
        return int(size)

    def modified(self, path: str) -> float | None:
        """The newest modification time of the object, or of the objects under a prefix."""
        p = self._p(path)
        try:
            infos = [self.fs.info(p)]
            if infos[0].get("type") == "directory":
                infos = list(self.fs.find(p, detail=True).values())
        except FileNotFoundError:
            return None
        times = [t for t in map(_mtime, infos) if t is not None]
        return max(times) if times else None

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        end = None if length is None else offset + length
        return self.fs.cat_file(self._p(path), start=offset, end=end)

    def write(self, path: str, data: bytes, durable: bool = True, exclusive: bool = True) -> None:
        # An object is durable once the store acknowledged it: `durable` needs nothing more.
        self.fs.pipe_file(self._p(path), data, mode="create" if exclusive else "overwrite")

    def makedirs(self, path: str) -> None:
        """Nothing to do: object stores have no folders."""

    def list(self, path: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self._p(path), detail=False)
        except FileNotFoundError:
            return []
        base = self._p(path).strip("/")
        names = {e.strip("/").rsplit("/", 1)[-1] for e in entries if e.strip("/") != base}
        return sorted(names)

    def delete(self, path: str) -> None:
        p = self._p(path)
        try:
            if self.fs.isdir(p):
                self.fs.rm(p, recursive=True)
            else:
                self.fs.rm_file(p)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(p)
