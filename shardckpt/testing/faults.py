"""Fault injection: damage files on disk, and make a save fail or die at a chosen stage.

``Faults`` wraps pytest's ``monkeypatch`` so every injected fault is undone after the test; the
``faults`` fixture in tests/conftest.py hands one to each test that asks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys


def flip_byte(path, offset: int, mask: int = 0xFF) -> None:
    """XOR one byte of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def truncate(path, nbytes: int) -> None:
    """Cut ``nbytes`` off the end of a file."""
    os.truncate(path, max(0, os.path.getsize(path) - nbytes))


@contextlib.contextmanager
def tiny_filesystem(where, size: str = "8m"):
    """Mount a ``size`` tmpfs at the existing folder ``where`` for the block and unmount it
    after; yields whether it could (root on Linux with mount rights), else leaves ``where``
    alone and yields False so the caller can inject ENOSPC instead."""
    mounted = (sys.platform == "linux" and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", os.fspath(where)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0)
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", os.fspath(where)], check=False)


def fill(where, leave: int) -> str:
    """Fill the file system holding the folder ``where`` up to ``leave`` free bytes with one
    file (returned); the space comes back when it is deleted."""
    st = os.statvfs(where)
    path = os.path.join(where, "filler")
    with open(path, "wb") as f:
        f.write(bytes(max(0, st.f_bavail * st.f_frsize - leave)))
    return path


class Faults:
    """Faults that hook into the save pipeline between its stages."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def before_manifest(self, action: str = "raise") -> None:
        """Fail the next commit after all data is durable but before the manifest is written:
        ``raise`` an OSError, or ``kill`` the process with SIGKILL (a crash, no cleanup)."""
        from shardckpt.save import commit

        def failing_commit(tx, manifest: bytes):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(5, "injected failure before the manifest")
        self.mp.setattr(commit.RenameCommit, "commit", failing_commit)

    def die_in_write(self, exitcode: int = 3) -> None:
        """End this process (``os._exit``, no cleanup) right after it wrote its data file, before
        it reports: a rank that dies in the middle of a distributed save."""
        from shardckpt.save import pipeline as saver
        real = saver.write_data_files

        def dying(*args, **kwargs):
            real(*args, **kwargs)
            os._exit(exitcode)
        self.mp.setattr(saver, "write_data_files", dying)

    def write_status(self, code: int, message: str = "injected", err: int = 0) -> None:
        """Make the codec backend's next ``write_file`` report ``code`` (see status.py)."""
        from shardckpt import codecs
        real = codecs.backend.write_file

        def failing(path, *args):
            real(path, *args)
            return (code, message, 0, err), [], {}
        self.mp.setattr(codecs.backend, "write_file", failing)

    def slow_writes(self, seconds: float) -> None:
        """Make every data file write take ``seconds`` longer (a slow disk)."""
        import time
        from shardckpt import codecs
        real = codecs.backend.write_file

        def slow(*args):
            time.sleep(seconds)
            return real(*args)
        self.mp.setattr(codecs.backend, "write_file", slow)

    def disk_full(self, where: str = "data") -> None:
        """ENOSPC while writing the ``data`` files (after writing them: the space is taken) or
        the ``manifest`` (before it is written), without a full file system."""
        from shardckpt.codecs import status
        if where == "data":
            self.write_status(status.NO_SPACE, "No space left on device", errno.ENOSPC)
            return
        from shardckpt.storage import LocalStorage
        real = LocalStorage.write

        def failing(storage, path, data, durable=True):
            if path.endswith("manifest.json"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(storage, path, data, durable)
        self.mp.setattr(LocalStorage, "write", failing)

    def stall_in_write(self, release, limit: float = 120.0) -> None:
        """Make the next data file write hang until the file ``release`` exists (a stuck rank:
        a hung file system, a livelocked process), at most ``limit`` seconds."""
        from shardckpt import codecs
        real = codecs.backend.write_file

        def stalled(*args):
            _wait_for(release, limit)
            return real(*args)
        self.mp.setattr(codecs.backend, "write_file", stalled)

    def die_in_read(self, exitcode: int = 3) -> None:
        """End this process (``os._exit``) when a load starts reading chunks: a rank that dies
        in the middle of a distributed load."""
        from shardckpt import codecs

        def dying(*args):
            os._exit(exitcode)
        self.mp.setattr(codecs.backend, "read_chunks", dying)

    def stall_in_read(self, release, limit: float = 120.0) -> None:
        """Make chunk reads hang until the file ``release`` exists, at most ``limit`` seconds."""
        from shardckpt import codecs
        real = codecs.backend.read_chunks

        def stalled(*args):
            _wait_for(release, limit)
            return real(*args)
        self.mp.setattr(codecs.backend, "read_chunks", stalled)


def _wait_for(path, limit: float) -> None:
    import time
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
