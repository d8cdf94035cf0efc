"""The shared-memory folder through which the ranks of one node hand each other loaded bytes.

On a shared load (share.py) one rank of a node reads a chunk's stored bytes (or receives them
from another node) into a file here, and the other ranks of the node map that file and decode
from it straight into their tensors: one copy through memory instead of a read from storage or
a trip through loopback TCP per rank.

The folder lives under ``/dev/shm`` (a temporary directory where there is none), is created by
the node's leader with mode 0700, and is named ``shardckpt-share-<uid>-<leader pid>-<token>``,
``token`` 63 random bits the leader draws (``secrets``) and hands the other ranks in the
all-reduce that tells them the manifest is there. Unguessable, so no other local user can take
the name first and block the load; made by ``mkdir``, which fails if the name exists, so a
planted folder is never adopted (the leader draws again). The other ranks refuse a folder that
is not a real directory owned by them with mode 0700. Files in it are named by round and rank number
only, never by anything read from a peer or a checkpoint. A file is unlinked once every local
rank has mapped it, the folder when the load ends; a leader sweeps away the folders of leaders
that died before they could.

Nothing here is ever unpickled: the files hold stored chunk bytes, which every rank checks
(CRC-32C) as it decodes them, exactly like bytes read from disk.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import secrets
import shutil
import socket
import stat
import tempfile

from ..errors import StorageError, UnsafeCheckpointError

PREFIX = "shardckpt-share-"


def base_dir() -> str:
    """Where share folders go: ``/dev/shm`` when it is a writable directory, else the temp dir."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


def host_key() -> int:
    """A number that ranks sharing this memory folder have in common and ranks on other hosts
    (or in containers with their own /dev/shm) almost surely do not: host name, boot id and the
    folder's device, hashed to a signed 63-bit integer."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    text = f"{socket.gethostname()}\0{boot}\0{os.stat(base_dir()).st_dev}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


MAKE_TRIES = 8  # fresh tokens tried before giving up (a collision alone is 2^-63 per try)


def folder_name(pid: int, token: int) -> str:
    return f"{PREFIX}{os.getuid()}-{int(pid)}-{int(token):016x}"


def new_token() -> int:
    """A share folder's token: 63 random bits, positive, so it travels in an int64 tensor."""
    return secrets.randbits(63)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(base: str | None = None) -> list[str]:
    """Remove this user's share folders whose leader process is gone; the paths removed."""
    base = base or base_dir()
    mine, removed = f"{PREFIX}{os.getuid()}-", []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        parts = name[len(mine):].split("-") if name.startswith(mine) else []
        if len(parts) == 2 and parts[0].isdigit() and not _alive(int(parts[0])):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(os.path.join(base, name))
    return removed


class NodeFolder:
    """One load's share folder on this node, as its leader made it (``create``) or as another
    local rank found it (``attach``)."""

    def __init__(self, path: str, owner: bool):
        self.path, self.owner, self.token = path, owner, 0
        self.written: set[str] = set()  # files this rank made, for unlinking

    @classmethod
    def create(cls, pid: int) -> "NodeFolder":
        """The leader's new, private folder under a fresh random name (after sweeping dead
        leaders' leftovers); ``token`` is what the other ranks need to ``attach``. A name that
        exists already (planted, or a collision) is never used: another token is drawn."""
        base = base_dir()
        sweep(base)
        for _ in range(MAKE_TRIES):
            token = new_token()
            path = os.path.join(base, folder_name(pid, token))
            try:
                os.mkdir(path, 0o700)  # exclusive: EEXIST if anyone made this name first
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise StorageError(exc.errno or 0, f"cannot make the share folder {path}: "
                                                   f"{exc}") from exc
        else:
            raise StorageError(errno.EEXIST, f"cannot make a share folder in {base}: "
                                             f"{MAKE_TRIES} fresh random names all existed")
        folder = cls(path, owner=True)
        folder.token = token
        folder.check()
        return folder

    @classmethod
    def attach(cls, pid: int, token: int) -> "NodeFolder":
        """The folder the node's leader (process ``pid``) made under ``token``, checked."""
        folder = cls(os.path.join(base_dir(), folder_name(pid, token)), owner=False)
        folder.token = token
        folder.check()
        return folder

    def check(self) -> None:
        """Refuse a folder that another user could have planted or can write into."""
        try:
            st = os.lstat(self.path)
        except OSError as exc:
            raise StorageError(exc.errno or 0, f"share folder {self.path}: {exc}") from exc
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or \
                stat.S_IMODE(st.st_mode) != 0o700:
            raise UnsafeCheckpointError(f"share folder {self.path} is not a private directory "
                                        "of this user (mode 0700)")

    def _file(self, name: str) -> str:
        if not name.replace("-", "").isalnum():  # round/rank numbers only, never a peer's text
            raise ValueError(f"bad share file name {name!r}")
        return os.path.join(self.path, name)

    def create_file(self, name: str, size: int, allocate_from: int = 0) -> int:
        """A new file of ``size`` bytes; its descriptor (the caller closes it). Bytes from
        ``allocate_from`` on are allocated now: they will be written through a mapping, and a
        full /dev/shm must be an error here, not a SIGBUS later. The bytes before are left to
        the writes that fill them (which report a full /dev/shm as ENOSPC, and skip zeroing
        pages first)."""
        path = self._file(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except OSError as exc:
            raise StorageError(exc.errno or 0, f"share file {path}: {exc}") from exc
        self.written.add(name)
        try:
            os.ftruncate(fd, size)
            if size > allocate_from:
                os.posix_fallocate(fd, allocate_from, size - allocate_from)
        except OSError as exc:
            os.close(fd)
            code = exc.errno or 0
            raise StorageError(code, f"share file {path}: {size} bytes: "
                               f"{'no space left' if code == errno.ENOSPC else exc}") from exc
        return fd

    def open_written(self, name: str) -> int:
        """A new write descriptor (its own file position) of a file this rank made."""
        if name not in self.written:
            raise ValueError(f"share file {name!r} is not this rank's")
        return os.open(self._file(name), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def map_file(self, name: str, size: int):
        """Another local rank's file, mapped read-only; it must hold exactly ``size`` bytes."""
        path = self._file(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(exc.errno or 0, f"share file {path}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != size:
                raise UnsafeCheckpointError(f"share file {path} has {st.st_size} bytes, "
                                            f"expected {size}, or is not this user's file")
            return map_fd(fd, size) if size else b""
        finally:
            os.close(fd)

    def read_file(self, name: str, size: int) -> bytes:
        """The first ``size`` bytes of another local rank's file (small files: the manifest)."""
        mapped = self.map_file(name, size)
        try:
            return bytes(mapped)
        finally:
            close(mapped)

    def unlink(self, name: str) -> None:
        """Remove a file this rank made (the others have mapped it already)."""
        if name in self.written:
            self.written.discard(name)
            try:
                os.unlink(self._file(name))
            except FileNotFoundError:
                pass

    def remove(self) -> None:
        """The end of the load: this rank's files go, and with the leader (or, after a failure,
        with any rank: the leader may be dead) the folder."""
        for name in list(self.written):
            self.unlink(name)
        if self.owner:
            shutil.rmtree(self.path, ignore_errors=True)

    def remove_all(self) -> None:
        """After a failed load: the whole folder, whoever made it."""
        self.written.clear()
        shutil.rmtree(self.path, ignore_errors=True)


_COPY_IN_KERNEL = [hasattr(os, "sendfile")]  # cleared once the kernel refuses


def copy_range(src: int, offset: int, dst: int, at: int, length: int) -> int:
    """Copy ``length`` bytes from ``src`` at ``offset`` to ``dst`` at ``at``; the bytes copied
    (fewer when ``src`` ends early). ``dst`` must be this caller's own descriptor: ``sendfile``
    writes at its file position. In the kernel where it can (page cache to page cache, about
    twice as fast here as a read into a mapping), else through a bounded buffer."""
    done = 0
    if _COPY_IN_KERNEL[0]:
        os.lseek(dst, at, os.SEEK_SET)
    while done < length and _COPY_IN_KERNEL[0]:
        try:
            n = os.sendfile(dst, src, offset + done, length - done)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or done:
                raise
            _COPY_IN_KERNEL[0] = False
            break
        if n <= 0:
            return done
        done += n
    while done < length:
        data = os.pread(src, min(length - done, 8 << 20), offset + done)
        if not data:
            break
        write_all(dst, data, at + done)
        done += len(data)
    return done


def write_all(fd: int, data, at: int) -> None:
    """Write all of ``data`` to ``fd`` at ``at``."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def map_fd(fd: int, size: int, write: bool = False) -> mmap.mmap:
    """``size`` bytes of an open share file, mapped shared and faulted in at once (one call
    instead of a page fault per 4 KiB as the decoder walks it)."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
    return mmap.mmap(fd, size, flags, prot)


def close(mapped) -> None:
    """Unmap ``mapped`` (a no-op for bytes); a mapping still viewed elsewhere is left to the
    garbage collector."""
    if isinstance(mapped, mmap.mmap):
        try:
            mapped.close()
        except BufferError:
            pass
