"""Local (and shared POSIX) file systems: atomic rename, fsync, native IO on real paths."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil

from ..errors import (DiskFullError, StorageError, StorageNotADirectoryError,
                      StoragePermissionError)
from .base import Storage

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _libc_renameat2()


def storage_error(exc: OSError, what: str) -> StorageError:
    """The typed error for an OSError while doing ``what``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{what}: {exc.strerror}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StoragePermissionError(exc.errno, f"{what}: {exc.strerror or exc}")
    if exc.errno == errno.ENOTDIR:
        return StorageNotADirectoryError(exc.errno, f"{what}: {exc.strerror or exc} (a file "
                                         "stands where a folder belongs)")
    return StorageError(exc.errno, f"{what}: {exc.strerror or exc}")


class LocalStorage(Storage):
    """A folder on a local or shared POSIX file system."""

    atomic_rename = True

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def local_path(self, path: str) -> str:
        return self._p(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(self._p(path))

    def size(self, path: str) -> int:
        return os.stat(self._p(path)).st_size

    def modified(self, path: str) -> float | None:
        try:
            return os.lstat(self._p(path)).st_mtime
        except (FileNotFoundError, NotADirectoryError):  # "file/child" of a plain file
            return None

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        with open(self._p(path), "rb") as f:
            f.seek(offset)
            if length is None:
                return f.read()
            # f.read(n) allocates n bytes up front, and a length is often a bound (the 1 GiB
            # manifest limit), not a size: ask for what the file holds, plus one to see growth.
            want = min(length, max(os.fstat(f.fileno()).st_size - offset, 0) + 1)
            data = f.read(want)
            return data if len(data) < want or want == length else data + f.read(length - want)

    def write(self, path: str, data: bytes, durable: bool = True, exclusive: bool = True) -> None:
        mode = os.O_EXCL if exclusive else os.O_TRUNC
        fd = os.open(self._p(path), os.O_CREAT | mode | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, path: str) -> None:
        os.makedirs(self._p(path), exist_ok=True)

    def list(self, path: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._p(path)))
        except FileNotFoundError:
            return []

    def delete(self, path: str) -> None:
        p = self._p(path)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except FileNotFoundError:  # gone meanwhile (another gc, retention): as asked
                pass

    def rename(self, src: str, dst: str, exchange: bool = False) -> None:
        if not exchange:
            os.rename(self._p(src), self._p(dst))
            return
        if _renameat2 is None:
            raise OSError(errno.ENOSYS, "renameat2 is unavailable")
        if _renameat2(_AT_FDCWD, os.fsencode(self._p(src)), _AT_FDCWD,
                      os.fsencode(self._p(dst)), _RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def sync_dir(self, path: str) -> None:
        fd = os.open(self._p(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
