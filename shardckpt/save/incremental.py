"""Incremental saves: chunks whose content an earlier checkpoint already stores are referenced,
not written again (FORMAT.md 3.6).

Every rank opens the base checkpoint's manifest itself (it lies under the same root) and builds
a ``BaseIndex``: each stored chunk by the xxh3-128 hash of its raw bytes. The native encode
workers hash every chunk they are handed and skip those whose hash the index knows, off the
caller's stall; ``saver.write_rank`` then turns each skipped chunk into a reference row that
points at the file and offset where the base (or the checkpoint the base itself referenced)
stores it. References are therefore always one hop: the ``base`` of a file entry is the
checkpoint that holds the bytes, never a chain.

A reference is only as good as the bytes it names, and the commit checks only the new manifest's
own rules. So before a chunk is referenced, ``BaseFiles`` checks its file (present, the recorded
size, the format's header: once per save) and the chunk's CRC-32C. A chunk that fails is not
referenced: the encoders skipped it, so the save writes it again from the live state (the
``extra`` path of ``saver.write_rank``) and the new checkpoint heals instead of inheriting the
damage. Reading every referenced byte on every save would cost a full read of the base, so a
chunk that passed is remembered for the life of the process under its file's identity (path,
device, inode, size, mtime and ctime): a file that was rewritten, truncated or replaced is read
again. Damage that leaves the identity alone (bit rot under a running job) is caught by the next
process, and its reach is bounded by the manager's periodic full save (``full_every``).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import replace

import numpy as np

from .. import codecs
from ..format import opening, refs
from ..errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from ..format.opening import check_data_file, open_manifest
from ..storage import Storage, open_checkpoint
from ..types import FileEntry, Manifest

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


_VERIFIED_FILES = 4096  # file identities whose checked chunks are remembered (least recent go)
_verified: OrderedDict[tuple, set] = OrderedDict()  # identity -> {(offset, length, crc)}
_verified_lock = threading.Lock()  # saves of several managers may run in one process


def _identity(storage: Storage, source) -> tuple | None:
    """What must stay equal for a chunk checked once to count as checked: the file's path and
    stat (a rewrite moves mtime and ctime, a replacement the inode); an object's URL, size and
    modification time. None (check every time) when the store cannot tell when it changed."""
    if isinstance(source, str):
        st = os.stat(source)
        return (source, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    when = storage.modified(source.path)
    return None if when is None else (storage.url(source.path), storage.size(source.path), when)


def _stored(storage: Storage, source, offset: int, length: int) -> bytes:
    if isinstance(source, str):
        with open(source, "rb") as fh:
            fh.seek(offset)
            return fh.read(length)
    return storage.read(source.path, offset, length)


class BaseFiles:
    """The base's data files as a save may reference them: each file checked once per save
    (present, its recorded size, the header), each chunk's CRC-32C before its first
    reference in this process (module docstring). A file or chunk that fails is reported once
    (a warning) and never referenced."""

    def __init__(self, storage: Storage, base: str, m: Manifest):
        self.storage, self.base, self.m = storage, base, m
        self.root = storage.local_path(base)
        self.sources: dict[int, tuple | None] = {}  # file index -> (source, identity) or None

    def _open(self, i: int):
        f = self.m.files[i]
        try:
            source = (check_data_file(self.root, f) if self.root is not None
                      else opening.check_object(self.storage, self.base, f))
            return source, _identity(self.storage, source)
        except (CheckpointError, OSError) as exc:
            self._damaged(self._where(i), exc)
            return None

    def _where(self, i: int) -> str:
        f = self.m.files[i]
        return f"{f.base or self.base}/{f.path}"

    def _damaged(self, where: str, exc) -> None:
        warnings.warn(f"shardckpt: base checkpoint {self.base!r}: {where} is damaged "
                      f"({type(exc).__name__}: {exc}); this save writes those chunks again "
                      "instead of referencing them", stacklevel=2)

    def chunk_ok(self, row) -> bool:
        """Whether base chunk row ``row`` (file, offset, length, ..., crc) may be referenced."""
        file, offset, length, crc = int(row[0]), int(row[1]), int(row[2]), int(row[6])
        if file not in self.sources:
            self.sources[file] = self._open(file)
        if self.sources[file] is None:
            return False
        source, ident = self.sources[file]
        with _verified_lock:
            if (offset, length, crc) in _verified.get(ident, ()):
                _verified.move_to_end(ident)
                return True
        try:
            data = _stored(self.storage, source, offset, length)
        except OSError as exc:
            self._damaged(f"{self._where(file)} at offset {offset}", exc)
            return False
        if len(data) != length or codecs.backend.crc32c(data) != crc:
            self._damaged(f"the chunk at offset {offset} of {self._where(file)}",
                          CorruptCheckpointError("crc32c mismatch"))
            return False
        if ident is None:
            return True
        with _verified_lock:
            _verified.setdefault(ident, set()).add((offset, length, crc))
            _verified.move_to_end(ident)
            while len(_verified) > _VERIFIED_FILES:
                _verified.popitem(last=False)
        return True


class BaseIndex:
    """The chunks of a committed base checkpoint by content hash, and the reference rows that
    one rank's save builds from them."""

    def __init__(self, storage: Storage, base: str, m: Manifest | None = None):
        self.base = base
        self.m = m if m is not None else open_manifest(storage, base)
        m = self.m
        self.checked = BaseFiles(storage, base, m)
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
        if not copies:  # the encoders only skip known hashes
            raise CorruptCheckpointError(f"no chunk with this content hash in base checkpoint "
                                         f"{self.base!r}")
        while True:  # the next stored copy whose bytes check out; a damaged one is skipped
            n = self.turn[digest] = self.turn.get(digest, -1) + 1
            if n >= len(copies):
                return None
            i = copies[n]
            if int(self.raw[i]) != nbytes:
                raise CorruptCheckpointError(f"no chunk of {nbytes} bytes with this content "
                                             f"hash in base checkpoint {self.base!r}")
            if self.checked.chunk_ok(self.rows[i]):
                break
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
    """The BaseIndex of ``base``; None without one, and None (a full save, with a warning) when
    its manifest is damaged: nothing of it can be trusted, and failing would lose the step.

    Raises:
        CheckpointNotFoundError, UnsafeCheckpointError: no such checkpoint, or a hostile one.
    """
    if base is None:
        return None
    try:
        m = open_manifest(storage, base)
    except CorruptCheckpointError as exc:
        warnings.warn(f"shardckpt: base checkpoint {base!r} is damaged ({exc}); this save "
                      "writes every chunk", stacklevel=2)
        return None
    return BaseIndex(storage, base, m)


def managed_base(storage: Storage, previous: str | None, full_every: int | None,
                 key: str) -> tuple[str | None, int]:
    """The base of a managed incremental save and its place in the chain (how many saves since
    the last full one, this one included; 0: a full save). ``previous``: the newest other
    committed checkpoint, whose metadata ``key`` holds its own place as ``"chain"``.

    A full save comes every ``full_every`` saves (None: never), which bounds how many
    checkpoints one damaged stored chunk can take with it; and when ``previous`` cannot be
    read, since nothing of it can be trusted."""
    if previous is None:
        return None, 0
    try:
        meta = open_manifest(storage, previous).metadata.get(key)
    except CheckpointError as exc:
        warnings.warn(f"shardckpt: checkpoint {previous!r} is damaged ({exc}); the next save "
                      "writes every chunk instead of referencing it", stacklevel=3)
        return None, 0
    chain = meta.get("chain") if isinstance(meta, dict) else None
    chain = (chain if isinstance(chain, int) and not isinstance(chain, bool) else 0) + 1
    if full_every is not None and chain >= full_every:
        return None, 0
    return previous, chain


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
