"""Demoting a committed checkpoint to weights only, crash-safely (FORMAT.md 3.6.4).

A checkpoint kept for comparison or deployment needs its weights, not its optimizer state, RNG
or data position. Demotion rewrites it in place as a checkpoint of one subtree (``model``):

1. **Copy.** The stored bytes of the kept tensors' chunks in the checkpoint's own files are
   copied, undecoded and CRC-checked, into new files ``data/weights-NNNNN.bin``; chunks in files
   of earlier checkpoints (references, FORMAT.md 3.6) stay where they are.
2. **Commit.** A manifest of the subtree alone (inline form, references kept, metadata kind
   ``weights``) replaces ``manifest.json`` in one atomic step: a rename over it where renames
   are atomic, one whole-object write on object stores.
3. **Sweep.** The checkpoint's files that its new manifest does not name and no other committed
   checkpoint references are deleted.

Readers see the old manifest until step 2 and the new one after it: the new files are named by
no manifest before the commit (readers ignore them), and step 3 deletes only files no committed
manifest names, so a kill at any instant leaves every checkpoint loadable in its old or its new
form. Files that newer (incremental) checkpoints reference stay until their last user goes
(retire.py). An interrupted demotion's unnamed files are deleted by the next attempt or sweep.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import replace

import numpy as np

from .. import codecs
from ..errors import CheckpointError, CorruptCheckpointError
from ..types import DATA_DIR, FILE_HEADER, HEADER_BYTES, MANIFEST_NAME, FileEntry, TensorEntry
from . import manifest as manifest_mod
from .opening import open_manifest
from .retire import ALL, held_files
from .tree import dict_items, node_kind, tensor_keys

WEIGHTS_KIND = "weights"
TMP_MARK = ".demote-"  # root-level temporary manifest: .<name>.demote-<hex>


class DemotionError(CheckpointError, ValueError):
    """A checkpoint cannot be demoted (its state has no such top-level key)."""


def is_weights(metadata: dict, meta_key: str) -> bool:
    """Whether a manifest's metadata marks a demoted (weights-only) checkpoint."""
    info = metadata.get(meta_key) if isinstance(metadata, dict) else None
    return isinstance(info, dict) and info.get("kind") == WEIGHTS_KIND


def _subtree(tree, key: str, where: str):
    kind, payload = node_kind(tree)
    if kind == "dict":
        for k, v in dict_items(payload):
            if k == key:
                return v
    raise DemotionError(f"{where}: the saved state has no top-level {key!r} to keep as weights")


def _overrides(m, key: str) -> tuple | None:
    """Rank overrides that lie under ``key`` (the rest of the state is dropped)."""
    if not m.rank_overrides:
        return None
    kept = []
    for rank, changes in m.rank_overrides:
        mine = [[path, node] for path, node in changes if path and path[0] == key]
        if mine:
            kept.append([rank, mine])
    return tuple(kept) or None


def _kept_keys(m, subtree, overrides) -> list[str]:
    names = set(tensor_keys(subtree))
    for _, changes in overrides or ():
        for _, node in changes:
            names |= set(tensor_keys(node))
    return [k for k in m.tensors if k in names]  # the manifest's order


def _fresh_name(taken: set[str], index: int) -> str:
    path, k = f"{DATA_DIR}/weights-{index:05d}.bin", 0
    while path in taken:
        k += 1
        path = f"{DATA_DIR}/weights-{index:05d}.{k}.bin"
    taken.add(path)
    return path


class _Writer:
    """One new data file, written through a local path when there is one (streamed and
    fsynced), else gathered and written as one object."""

    def __init__(self, storage, path: str):
        self.storage, self.path, self.size = storage, path, HEADER_BYTES
        local = storage.local_path(path)
        self.fh = open(local, "xb") if local is not None else None
        self.parts = [] if self.fh is None else None
        self._put(FILE_HEADER)

    def _put(self, data: bytes) -> None:
        if self.fh is not None:
            self.fh.write(data)
        else:
            self.parts.append(data)

    def append(self, data: bytes) -> int:
        offset = self.size
        self._put(data)
        self.size += len(data)
        return offset

    def close(self) -> None:
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
        else:
            self.storage.write(self.path, b"".join(self.parts), durable=True, exclusive=False)


def _copy_chunks(storage, name: str, m, keys: list[str]):
    """Step 1: the kept tensors with their chunk rows pointing at the new files, and the new
    manifest's files (referenced ones kept, then the new ones)."""
    used = sorted({int(f) for k in keys for f in m.tensors[k].chunks[:, 0]})
    taken = {f.path for f in m.files if f.base is None}
    files, remap, writers = [], {}, {}
    for i in used:
        f = m.files[i]
        if f.base is not None:
            remap[i] = len(files)
            files.append(f)
    for i in used:
        f = m.files[i]
        if f.base is None:
            remap[i] = len(files)
            path = _fresh_name(taken, i)
            writers[i] = _Writer(storage, f"{name}/{path}")
            files.append(FileEntry(path, 0, f.rank))
    tensors = {}
    try:
        for key in keys:
            t = m.tensors[key]
            rows = t.chunks.copy()
            for r in rows:
                src = int(r[0])
                if src in writers:
                    data = storage.read(f"{name}/{m.files[src].path}", int(r[1]), int(r[2]))
                    if len(data) != r[2] or codecs.backend.crc32c(data) != int(r[6]):
                        raise CorruptCheckpointError("a chunk fails its CRC-32C while demoting",
                                                     file=f"{name}/{m.files[src].path}",
                                                     tensor=key)
                    r[1] = writers[src].append(data)
                r[0] = remap[src]
            tensors[key] = TensorEntry(t.dtype, t.shape, t.boxes, t.counts, rows)
    finally:
        for w in writers.values():
            w.close()
    sizes = {remap[i]: w.size for i, w in writers.items()}
    files = [replace(f, size=sizes[j]) if j in sizes else f for j, f in enumerate(files)]
    return tensors, tuple(files)


def _hashes(m, keys: list[str]):
    """The content-hash rows of the kept tensors (FORMAT.md 3.6: chunk rows in tensor order)."""
    if m.hashes is None:
        return None
    rows, at = [], 0
    wanted = set(keys)
    for key, t in m.tensors.items():
        n = len(t.chunks)
        if key in wanted:
            rows.append(m.hashes[at:at + n])
        at += n
    return np.concatenate(rows) if rows else np.empty((0, 2), np.int64)


def _commit(storage, name: str, data: bytes) -> None:
    """Step 2: the new manifest replaces the old in one atomic step."""
    if not storage.atomic_rename:
        storage.write(f"{name}/{MANIFEST_NAME}", data, durable=True, exclusive=False)
        return
    tmp = f".{name}{TMP_MARK}{secrets.token_hex(4)}"
    storage.write(tmp, data, durable=True)
    try:
        storage.rename(tmp, f"{name}/{MANIFEST_NAME}")
    except BaseException:
        storage.delete(tmp)
        raise
    storage.sync_dir(name)


def sweep(storage, name: str, m=None) -> int:
    """Step 3 (and the clean-up of interrupted demotions): delete ``name``'s data and index
    files that its manifest does not name and no other committed checkpoint references.
    Returns the bytes freed."""
    m = m or open_manifest(storage, name)
    named = {f.path for f in m.files if f.base is None} | {i.path for i in m.indexes or ()}
    held, _ = held_files(storage, name)
    if held is ALL:
        return 0
    freed = 0
    for f in storage.list(f"{name}/{DATA_DIR}"):
        path = f"{DATA_DIR}/{f}"
        if path in named or path in held:
            continue
        try:
            size = storage.size(f"{name}/{path}")
            storage.delete(f"{name}/{path}")
        except FileNotFoundError:
            continue
        freed += size
    return freed


def demote(storage, name: str, key: str = "model", meta_key: str = "shardckpt.manager") -> dict:
    """Turn committed checkpoint ``name`` into a weights-only one holding the ``key`` subtree.

    Args:
        storage: the root holding ``name``.
        name: the checkpoint folder.
        key: the state's top-level key to keep.
        meta_key: the metadata key whose ``kind`` becomes ``"weights"``.

    Returns:
        ``{"demoted": bool, "written_bytes": int, "freed_bytes": int}`` (demoted False: it
        already was).

    Raises:
        DemotionError: the state has no ``key``.
        CorruptCheckpointError: a chunk to keep fails its checksum (nothing is committed).
        StorageError: the storage failed (the checkpoint stays as it was, or demoted).
    """
    m = open_manifest(storage, name)
    if is_weights(m.metadata, meta_key):
        return {"demoted": False, "written_bytes": 0, "freed_bytes": sweep(storage, name, m)}
    where = storage.url(name)
    subtree = _subtree(m.tree, key, where)
    overrides = _overrides(m, key)
    keys = _kept_keys(m, subtree, overrides)
    sweep(storage, name, m)  # an earlier interrupted demotion's unnamed files
    tensors, files = _copy_chunks(storage, name, m, keys)
    info = dict(m.metadata.get(meta_key) or {})
    info.update(kind=WEIGHTS_KIND, weights_key=key, demoted_unix=time.time())
    new = replace(m, files=files, tensors=tensors, tree={"dict": [[key, subtree]]},
                  rank_overrides=overrides, hashes=_hashes(m, keys), indexes=None,
                  metadata={**m.metadata, meta_key: info})
    data = manifest_mod.to_json(new)
    manifest_mod.check_complete(replace(manifest_mod.parse(data), name=where), where)
    _commit(storage, name, data)
    written = sum(f.size for f in files if f.base is None)
    return {"demoted": True, "written_bytes": written, "freed_bytes": sweep(storage, name, new)}
