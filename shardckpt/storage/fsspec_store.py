"""Any fsspec file system (``memory://``, ``gs://``, ``az://``, ...): no rename, no fsync.

Objects are written whole (``pipe_file``; create-if-absent through fsspec's ``mode="create"``,
atomic where the store supports it) and read by byte range (``cat_file``). There are no real
folders: ``makedirs`` does nothing and a folder exists while an object lies under it. The commit
is therefore the manifest-last marker (commit.MarkerCommit). S3 adds concurrent multipart uploads
in s3.py.
"""

from __future__ import annotations

from .base import Storage


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
