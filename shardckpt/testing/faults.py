"""Fault injection: damage files on disk, and make a save fail or die at a chosen stage.

``Faults`` wraps pytest's ``monkeypatch`` so every injected fault is undone after the test; the
``faults`` fixture in tests/conftest.py hands one to each test that asks.
"""

from __future__ import annotations

import os
import signal


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


class Faults:
    """Faults that hook into the save pipeline between its stages."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def before_manifest(self, action: str = "raise") -> None:
        """Fail the next commit after all data is durable but before the manifest is written:
        ``raise`` an OSError, or ``kill`` the process with SIGKILL (a crash, no cleanup)."""
        from shardckpt import commit

        def failing_commit(tx, manifest: bytes):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(5, "injected failure before the manifest")
        self.mp.setattr(commit.RenameCommit, "commit", failing_commit)

    def die_in_write(self, exitcode: int = 3) -> None:
        """End this process (``os._exit``, no cleanup) right after it wrote its data file, before
        it reports: a rank that dies in the middle of a distributed save."""
        from shardckpt import saver
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
