"""Moving encoded data files between ranks over a gloo process group (the local tier).

Only bytes travel: a small JSON header (names and sizes) and the files' contents, in blocks of
at most ``local_transfer_bytes``, so a rank holds about one outgoing and one incoming block at a
time, whatever the file sizes. Nothing goes through the c10d store and nothing is pickled. A
received file is written to a hidden sibling, made durable and renamed into place, so a
transfer cut short never leaves a partial file under a data file's name.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import secrets

import torch

from .. import knobs
from ..errors import CheckpointError, TransferError, UnsafeCheckpointError
from ..storage import storage_error
from ..types import DATA_DIR, MANIFEST_NAME

_NAME = re.compile(rf"({re.escape(DATA_DIR)}/[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}\.bin|"
                   rf"{re.escape(MANIFEST_NAME)})")


def _block() -> int:
    return max(int(knobs.get("local_transfer_bytes")), 1)


def _pair(dist, group, out: torch.Tensor | None, dst: int | None, inp: torch.Tensor | None,
          src: int | None, what: str) -> None:
    """Send ``out`` to ``dst`` while receiving ``inp`` from ``src`` (either may be None)."""
    works = []
    try:
        if out is not None:
            works.append(dist.isend(out, dst, group=group))
        if inp is not None:
            works.append(dist.irecv(inp, src, group=group))
        for w in works:
            w.wait()
    except Exception as exc:  # gloo reports a dead peer as a RuntimeError of its own
        peers = ", ".join(f"{k} rank {r}" for k, r in (("to", dst), ("from", src))
                          if r is not None)
        raise TransferError(f"{what} ({peers}) failed: {type(exc).__name__}: {exc}") from exc


def _send_header(dist, group, files: list, dst, src, what: str) -> tuple | None:
    """Exchange the headers (the sender's block size and ``[[name, size], ...]``); the one
    received as ``(block, [(name, size), ...])`` (None without ``src``)."""
    data = json.dumps({"block": _block(), "files": files}).encode() if dst is not None else b""
    n_out = torch.tensor([len(data)], dtype=torch.int64)
    n_in = torch.zeros(1, dtype=torch.int64)
    _pair(dist, group, n_out if dst is not None else None, dst,
          n_in if src is not None else None, src, f"{what}: header size")
    body_out = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
    body_in = torch.empty(int(n_in), dtype=torch.uint8) if src is not None else None
    _pair(dist, group, body_out if dst is not None else None, dst, body_in, src,
          f"{what}: header")
    if src is None:
        return None
    try:
        got = json.loads(bytes(body_in.numpy()))
        return max(int(got["block"]), 1), [(_checked(n), int(size)) for n, size in got["files"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise TransferError(f"{what}: rank {src} sent a malformed header: {exc}") from None


def _checked(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UnsafeCheckpointError(f"{name!r}: not a checkpoint file name; refusing to write it")
    return name


def exchange_files(dist, group, folder: str, outgoing: list[str], dst: int | None,
                   src: int | None, dest_folder: str | None = None, what: str = "replicate",
                   discard: bool = False) -> list[str]:
    """Send the files ``outgoing`` (relative to ``folder``) to rank ``dst`` while receiving
    rank ``src``'s into ``dest_folder`` (default ``folder``); the names received.

    Every block is a send/recv pair, so two ranks that send to each other never deadlock.
    Raises TransferError naming the peer when one dies or hangs past the group's timeout.
    With ``discard`` the received blocks are dropped (a receiver that already failed still
    takes every block, so that its sender is never left waiting) and no name is returned.
    """
    dest_folder = dest_folder or folder
    sizes = [os.path.getsize(os.path.join(folder, r)) for r in outgoing] if dst is not None \
        else []
    theirs, incoming = _send_header(dist, group, [[r, s] for r, s in zip(outgoing, sizes)],
                                    dst, src, what) or (1, [])
    block = _block()
    out_blocks = [(r, off, min(block, s - off)) for r, s in zip(outgoing, sizes)
                  for off in range(0, s, block)]
    in_blocks = [(r, off, min(theirs, s - off)) for r, s in incoming
                 for off in range(0, s, theirs)]
    writers = _Writers(dest_folder, [] if discard else incoming)
    if discard:
        writers.error = False  # not None: ``put`` drops every block
    try:
        with _Readers(folder) as readers:
            for i in range(max(len(out_blocks), len(in_blocks))):
                out = readers.block(*out_blocks[i]) if i < len(out_blocks) else None
                inp = torch.empty(in_blocks[i][2], dtype=torch.uint8) \
                    if i < len(in_blocks) else None
                _pair(dist, group, out, dst if out is not None else None, inp,
                      src if inp is not None else None, f"{what}: data")
                if inp is not None:
                    writers.put(in_blocks[i][0], inp)
        if not discard:
            writers.finish()
    finally:
        writers.close()
    return [] if discard else [r for r, _ in incoming]


class _Readers:
    """Files to send from, mapped: a block goes to gloo straight from the page cache (a
    private mapping, so the writable view torch wants never writes the file), no copy."""

    def __init__(self, folder: str):
        self.folder, self.open = folder, {}

    def __enter__(self) -> "_Readers":
        return self

    def block(self, rel: str, offset: int, length: int) -> torch.Tensor:
        if rel not in self.open:
            path = os.path.join(self.folder, rel)
            try:
                with open(path, "rb") as f:
                    self.open[rel] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise TransferError(f"cannot map {path} to send it: {exc}") from exc
        return torch.frombuffer(self.open[rel], dtype=torch.uint8, count=length,
                                offset=offset)

    def __exit__(self, *exc) -> None:
        for m in self.open.values():
            try:
                m.close()
            except BufferError:  # a block's tensor is still referenced: freed with it
                pass


class _Writers:
    """Files being received: each into a hidden temporary sibling, renamed in when complete."""

    def __init__(self, folder: str, incoming: list):
        self.folder, self.expect = folder, dict(incoming)
        self.fds: dict[str, tuple[int, str]] = {}
        self.done: list[str] = []
        self.error: BaseException | None = None

    def put(self, rel: str, data: torch.Tensor) -> None:
        """Append a received block. A write error is kept for ``finish`` and later blocks are
        dropped: the transfer goes on, so the sender is never left blocked on a dead receiver."""
        if self.error is not None:
            return
        try:
            self._put(rel, data)
        except CheckpointError as exc:
            self.error = exc

    def _put(self, rel: str, data: torch.Tensor) -> None:
        if rel not in self.fds:
            final = os.path.join(self.folder, rel)
            tmp = os.path.join(os.path.dirname(final),
                               f".{os.path.basename(final)}.recv-{secrets.token_hex(4)}")
            try:
                os.makedirs(os.path.dirname(final), exist_ok=True)
                self.fds[rel] = (os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY
                                         | os.O_CLOEXEC, 0o644), tmp)
            except OSError as exc:
                raise storage_error(exc, f"receiving {final}") from exc
        fd, tmp = self.fds[rel]
        view = memoryview(data.numpy())
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            raise storage_error(exc, f"writing {tmp}") from exc

    def finish(self) -> None:
        """Make every received file durable and rename it into place."""
        if self.error is not None:
            raise self.error
        for rel in self.expect:
            if rel not in self.fds:  # an empty file: no block carried it
                self.put(rel, torch.empty(0, dtype=torch.uint8))
        for rel, (fd, tmp) in list(self.fds.items()):
            try:
                os.fsync(fd)
                os.close(fd)
                os.rename(tmp, os.path.join(self.folder, rel))
            except OSError as exc:
                raise storage_error(exc, f"committing the received {rel}") from exc
            del self.fds[rel]
            self.done.append(rel)

    def close(self) -> None:
        """Remove what was not completed (a failed transfer)."""
        for fd, tmp in self.fds.values():
            try:
                os.close(fd)
                os.unlink(tmp)
            except OSError:
                pass
        self.fds.clear()
