"""Build hostile checkpoints: manifests edited and re-signed, and pickle payloads planted.

An attacker who can write a checkpoint can also recompute its checksums, so the tests that play
one edit the manifest's JSON and tables and then re-sign it (``resign``): the structural checks,
not the CRC, must be what refuses the edit.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np

from .. import codecs
from ..format import manifest, tables
from ..types import MANIFEST_NAME


def resign(doc: dict) -> bytes:
    """Manifest bytes for ``doc`` with a valid ``manifest_crc32c``."""
    doc = {k: v for k, v in doc.items() if k != "manifest_crc32c"}
    body = json.dumps(doc, separators=(",", ":")).encode()[:-1]
    return body + manifest.CRC_MEMBER + str(codecs.backend.crc32c(body)).encode() + b"}"


def read_doc(path) -> dict:
    """The checkpoint's manifest as a plain JSON object."""
    with open(os.path.join(path, MANIFEST_NAME), "rb") as f:
        return json.loads(f.read())


def rewrite(path, mutate) -> None:
    """Apply ``mutate(doc)`` to the checkpoint's manifest and write it back, re-signed."""
    doc = read_doc(path)
    mutate(doc)
    with open(os.path.join(path, MANIFEST_NAME), "wb") as f:
        f.write(resign(doc))


def edit_table(doc: dict, key: str, field: str, edit) -> None:
    """Replace tensor ``key``'s ``shards`` or ``chunks`` table by ``edit(rows)``."""
    nd = len(doc["tensors"][key]["shape"])
    columns = 7 if field == "chunks" else 2 * nd + 1
    rows = tables.decode(doc["tensors"][key][field], columns, field).copy()
    doc["tensors"][key][field] = tables.encode(np.asarray(edit(rows), np.int64))


def set_cell(row: int, col: int, value: int):
    """A table edit that sets one cell."""
    def edit(rows):
        rows[row, col] = value
        return rows
    return edit


class MarkerPayload:
    """Unpickling this creates ``marker`` (it reduces to ``open(marker, "w")``): proof of
    execution that harms nothing."""

    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(marker) -> bytes:
    """Pickle bytes whose loading creates ``marker``."""
    return pickle.dumps(MarkerPayload(marker), protocol=2)


def rle_frame(nbytes: int, value: int = 0, declared: int | None = None) -> bytes:
    """A zstd frame of ``nbytes`` copies of ``value`` built from RLE blocks (4 stored bytes per
    128 KiB, zstd's densest form), declaring ``declared`` (default ``nbytes``) as its content
    size: a decompression bomb that costs nothing to build."""
    declared = nbytes if declared is None else declared
    out = bytearray(b"\x28\xb5\x2f\xfd\xe0")  # magic; single segment, 8-byte content size
    out += declared.to_bytes(8, "little")
    block = 1 << 17
    left = nbytes
    while True:
        size = min(left, block)
        left -= size
        header = (1 if left == 0 else 0) | (1 << 1) | (size << 3)  # last flag, type RLE, size
        out += header.to_bytes(3, "little") + bytes([value])
        if left == 0:
            return bytes(out)


class AuditLog:
    """Records the audit events (PEP 578) raised while active: every ``open`` of a file by
    Python code, every global an unpickler resolves (``pickle.find_class``), every process
    started. Audit hooks cannot be removed, so one hook serves every AuditLog of the process."""

    _active: list = []
    _installed = False

    WATCHED = ("open", "pickle.find_class", "marshal.loads", "subprocess.Popen", "os.system",
               "os.exec", "os.posix_spawn", "ctypes.dlopen")

    def __init__(self):
        self.events: list[tuple[str, tuple]] = []

    @classmethod
    def _hook(cls, event, args):
        if cls._active and event in cls.WATCHED:
            cls._active[-1].events.append((event, args))

    def __enter__(self) -> "AuditLog":
        if not AuditLog._installed:
            import sys
            sys.addaudithook(AuditLog._hook)
            AuditLog._installed = True
        AuditLog._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        AuditLog._active.remove(self)

    def of(self, event: str) -> list[tuple]:
        """The arguments of each recorded ``event``."""
        return [args for name, args in self.events if name == event]

    def opened(self) -> list[str]:
        """Paths Python opened (file descriptors passed to ``open`` are skipped)."""
        return [os.fspath(a[0]) for a in self.of("open") if isinstance(a[0], (str, bytes,
                                                                                os.PathLike))]
