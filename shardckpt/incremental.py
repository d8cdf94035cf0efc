"""Incremental saves: chunks whose content an earlier checkpoint already stores are referenced,
not written again (FORMAT.md 3.6).

Every rank opens the base checkpoint's manifest itself (it lies under the same root) and builds
a ``BaseIndex``: each stored chunk by the xxh3-128 hash of its raw bytes. The native encode
workers hash every chunk they are handed and skip those whose hash the index knows, off the
caller's stall; ``saver.write_rank`` then turns each skipped chunk into a reference row that
points at the file and offset where the base (or the checkpoint the base itself referenced)
stores it. References are therefore always one hop: the ``base`` of a file entry is the
checkpoint that holds the bytes, never a chain.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from . import refs
from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .read import open_manifest
from .storage import Storage, open_checkpoint
from .types import FileEntry, Manifest

REF_FILE = -1  # chunk rows of a rank report with file < 0 name report["ref_files"][-1 - file]


def base_name(storage: Storage, name: str, base, storage_options: dict | None = None):
    """The folder name of ``base`` (a sibling name, or a path or URL under the same root as the
    checkpoint ``name`` of ``storage``); None for a full save.

    Raises:
        UnsafeCheckpointError: ``base`` lies under another root, or is no plain folder name.
        ValueError: ``base`` is the checkpoint being saved.
    """
    if base is None:
        return None
    text = os.fspath(base)
    if "/" in text or os.sep in text:
        other, text = open_checkpoint(text, storage_options)
        if other.url(text) != storage.url(text):
            raise UnsafeCheckpointError(f"base {os.fspath(base)!r} is not under the root of "
                                        f"{storage.url(name)}: references stay inside the "
                                        "same root")
    refs.check_base_name(text, "base")
    if text == name:
        raise ValueError(f"{name}: a checkpoint cannot be its own base")
    return text


class BaseIndex:
    """The chunks of a committed base checkpoint by content hash, and the reference rows that
    one rank's save builds from them."""

    def __init__(self, storage: Storage, base: str):
        self.base = base
        self.m = open_manifest(storage, base)
        m = self.m
        # Files as the new manifest names them: a file the base stores itself gets base=base;
        # one it references keeps its own base (one hop, never a chain).
        self.files = [f if f.base is not None else replace(f, base=base) for f in m.files]
        if m.hashes is None or not m.tensors:  # saved without hashes: nothing to match
            self.rows, self.raw, self.lookup, self.known = np.empty((0, 7), np.int64), [], {}, b""
        else:
            self.rows = np.concatenate([t.chunks for t in m.tensors.values()])
            self.raw = np.concatenate([t.chunks[:, 4] * t.dtype.itemsize
                                       for t in m.tensors.values()])
            hashes = np.ascontiguousarray(m.hashes, "<i8")
            self.lookup: dict[bytes, list[int]] = {}
            for i in range(len(hashes)):
                self.lookup.setdefault(hashes[i].tobytes(), []).append(i)
            self.known = b"".join(self.lookup)
        self.turn: dict[bytes, int] = {}  # equal chunks take the base's copies, each once
        self.used: dict[tuple[str, str], int] = {}  # (base, path) -> index in ref_files
        self.ref_files: list[dict] = []

    def reference(self, digest: bytes, start: int, count: int, nbytes: int,
                  table) -> list[int] | None:
        """The chunk row (file column ``REF_FILE - j``) that references the stored chunk with
        content hash ``digest`` for a new chunk of ``count`` elements at ``start``; None when
        every stored copy is referenced already (rows never overlap, FORMAT.md 3.6: the
        caller writes this chunk)."""
        copies = self.lookup.get(digest)
        i = None
        if copies:
            n = self.turn[digest] = self.turn.get(digest, -1) + 1
            if n >= len(copies):
                return None
            i = copies[n]
        if i is None or int(self.raw[i]) != nbytes:  # the encoders only skip known hashes
            raise CorruptCheckpointError(f"no chunk of {nbytes} bytes with this content hash in "
                                         f"base checkpoint {self.base!r}")
        file, offset, length, _, _, codec, crc = (int(v) for v in self.rows[i])
        f = self.files[file]
        key = (f.base, f.path)
        if key not in self.used:
            self.used[key] = len(self.ref_files)
            self.ref_files.append({"path": f.path, "size": f.size, "rank": f.rank,
                                   "base": f.base})
        chain = table.intern(tuple(self.m.codecs[codec]))
        return [REF_FILE - self.used[key], offset, length, start, count, chain, crc]


def open_base(storage: Storage, base: str | None) -> BaseIndex | None:
    """The BaseIndex of ``base`` (None without one)."""
    return None if base is None else BaseIndex(storage, base)


def file_entries(results: dict[int, dict]) -> tuple[list[FileEntry], dict[int, np.ndarray],
                                                    dict[int, np.ndarray]]:
    """The manifest's files from every rank's report: the files each rank wrote, then each
    referenced file once. Also, per rank, the global index of its written files' first entry
    (as a 1-element array) and of each of its ``ref_files``."""
    files, first, ref_index, seen = [], {}, {}, {}
    for rank in sorted(results):
        first[rank] = np.array([len(files)], np.int64)
        files += [FileEntry(f["path"], f["size"], rank) for f in results[rank]["files"]]
    for rank in sorted(results):
        ids = []
        for f in results[rank].get("ref_files", []):
            key = (f["base"], f["path"])
            if key not in seen:
                seen[key] = len(files)
                files.append(FileEntry(f["path"], f["size"], f["rank"], f["base"]))
            ids.append(seen[key])
        ref_index[rank] = np.array(ids or [0], np.int64)
    return files, first, ref_index


def place_rows(rows: np.ndarray, first: np.ndarray, ref_index: np.ndarray) -> None:
    """Point a rank's chunk rows at the global files table, in place."""
    ref = rows[:, 0] < 0
    rows[~ref, 0] += first[0]
    rows[ref, 0] = ref_index[REF_FILE - rows[ref, 0]]


def split_hashes(tensors: dict, hashed: bool) -> tuple[dict, np.ndarray | None]:
    """Tensor entries whose chunk rows carry two hash columns (7, 8) without them, and the hash
    rows in manifest order (None when the save did not hash)."""
    if not hashed:
        return tensors, None
    parts = [t.chunks[:, 7:9] for t in tensors.values()]
    out = {k: replace(t, chunks=np.ascontiguousarray(t.chunks[:, :7]))
           for k, t in tensors.items()}
    return out, (np.concatenate(parts) if parts else np.empty((0, 2), np.int64))


def written_split(m: Manifest) -> dict:
    """Bytes a checkpoint wrote itself and bytes it references (for ``ls`` and ``SaveInfo``)."""
    written, referenced = refs.stored_split(m)
    return {"written_bytes": written, "referenced_bytes": referenced}
