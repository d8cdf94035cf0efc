"""The public calls: ``save``, ``load``, ``load_full``, ``verify``.

Each is a short pipeline over the stage modules. Save: flatten (tree) -> plan chunks (plan) ->
encode + write (write) -> manifest + commit (commit). Load: manifest (read) -> match the target
(place) -> plan reads, fetch, decode into place (read) -> apply.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import manifest as manifest_mod
from .commit import RenameCommit
from .errors import StateMismatchError, UnsupportedValueError
from .place import match
from .plan import plan_chunks
from .read import ReadPlan, data_paths, open_manifest
from .storage import open_checkpoint
from .tree import build, flatten
from .types import (DATA_DIR, DTYPE_BY_TORCH, HEADER_BYTES, FileEntry, Manifest, ShardEntry,
                    TensorEntry, TensorItem)
from .write import CodecTable, WriteOptions, write_data_file


@dataclass(frozen=True)
class SaveInfo:
    """What a save wrote."""

    path: str
    tensors: int
    raw_bytes: int
    stored_bytes: int
    seconds: float
    stats: dict = field(default_factory=dict)


def _check_metadata(metadata) -> dict:
    metadata = {} if metadata is None else metadata
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UnsupportedValueError(f"metadata must be plain JSON: {exc}") from None
    if not isinstance(metadata, dict):
        raise UnsupportedValueError("metadata must be a dict")
    return metadata


def save(state: Any, path, *, codec: str | None = None, level: int | None = None,
         metadata: dict | None = None, overwrite: bool = False, durable: bool = True,
         storage_options: dict | None = None, **tuning) -> SaveInfo:
    """Save ``state`` as a checkpoint folder at ``path``, atomically.

    Args:
        state: nested dicts / lists / tuples of tensors, ints, floats, strs, bools, None,
            dtypes, and objects with ``state_dict()`` / ``load_state_dict()``.
        path: the checkpoint folder (created; its parent must exist).
        codec: ``"auto"`` (default), ``"zstd"`` or ``"raw"`` (see knobs.py).
        level: zstd level (default 1; negative = faster).
        metadata: a JSON-able dict stored in the manifest.
        overwrite: replace an existing checkpoint (atomically) instead of raising.
        durable: fsync data and manifest before the commit (leave on outside benchmarks).
        storage_options: reserved for fsspec backends.
        **tuning: ``chunk_bytes``, ``pool_bytes``, ``encode_threads``, ``write_threads``.

    Returns:
        SaveInfo with sizes and the pipeline's statistics.

    Raises:
        UnsupportedValueError: a value cannot be saved without pickling (its path is named).
        CheckpointExistsError: ``path`` holds a checkpoint and ``overwrite`` is false.
        DiskFullError, StorageError: writing failed; nothing was committed.
    """
    t0 = time.perf_counter()
    opts = WriteOptions.resolve(codec=codec, level=level, durable=durable, **tuning)
    metadata = _check_metadata(metadata)
    storage, name = open_checkpoint(path, storage_options)
    tree, items = flatten(state)
    table = CodecTable()
    with RenameCommit(storage, name, overwrite) as tx:
        tensors, file, stats = _write_shard(storage.local_path(tx.path(RANK0_FILE)), items,
                                            opts, table)
        m = Manifest(world_size=1, files=(file,), codecs=tuple(table.chains), tensors=tensors,
                     tree=tree, metadata=metadata, created_unix=time.time())
        tx.commit(manifest_mod.to_json(m))
    return SaveInfo(storage.local_path(name), len(items), stats.get("raw_bytes", 0),
                    file.size - HEADER_BYTES, time.perf_counter() - t0, stats)


RANK0_FILE = f"{DATA_DIR}/rank-00000.bin"


def _write_shard(path: str, items: list[TensorItem], opts: WriteOptions, table: CodecTable):
    """Write every item whole into one data file: ``(tensor entries, file entry, stats)``."""
    sources, hosts = plan_chunks(items, opts.chunk_bytes)
    refs, size, stats = write_data_file(path, RANK0_FILE, 0, sources, opts, table)
    by_key: dict[str, list] = {item.key: [] for item in items}
    for src, ref in zip(sources, refs):
        by_key[src.key].append(ref)
    tensors = {}
    for item, host in zip(items, hosts):
        shape = tuple(host.shape)
        shard = ShardEntry((0,) * len(shape), shape, tuple(by_key[item.key]))
        tensors[item.key] = TensorEntry(DTYPE_BY_TORCH[host.dtype], shape, (shard,))
    return tensors, FileEntry(RANK0_FILE, size, 0), stats


def load(state: Any, path, *, strict: bool = True, threads: int | None = None,
         storage_options: dict | None = None) -> Any:
    """Load a checkpoint into ``state`` in place and return it.

    Tensors are filled in place (same shape and dtype required; any device); non-tensor leaves
    are replaced; objects with ``load_state_dict`` receive their loaded state dict. Optimizers
    that have no state yet gain it from the checkpoint.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError: nothing committed at ``path``.
        StateMismatchError: every missing / unexpected key and shape or dtype difference at once;
            the target is untouched.
        CorruptCheckpointError, UnsafeCheckpointError: the checkpoint fails its checks. Tensors
            read before the fault may already hold checkpoint values; the files are untouched.
    """
    storage, name = open_checkpoint(path, storage_options)
    m = open_manifest(storage, name)
    paths = data_paths(storage, name, m)
    result, placement = match(state, m, strict)
    if placement.missing or placement.unexpected or placement.mismatched:
        raise StateMismatchError(placement.missing, placement.unexpected, placement.mismatched)
    plan, planned = ReadPlan(m), set()
    for key, target in placement.fills:
        ident = (key, target.device, target.data_ptr(), target.stride())
        if ident not in planned:  # tied weights: the same memory is filled once
            planned.add(ident)
            plan.into(key, target)
    for key, fresh in placement.new.items():
        plan.into(key, fresh)
    plan.run(paths, threads)
    placement.apply()
    return result


def load_full(path, *, threads: int | None = None, storage_options: dict | None = None) -> Any:
    """The whole saved state with every tensor whole, on the CPU; no process group needed."""
    storage, name = open_checkpoint(path, storage_options)
    m = open_manifest(storage, name)
    paths = data_paths(storage, name, m)
    plan, made = ReadPlan(m), {}

    def tensor(key):
        if key not in made:
            entry = m.tensors[key]
            made[key] = t = torch.empty(entry.shape, dtype=entry.dtype.torch)
            plan.into(key, t)
        return made[key]

    state = build(m.tree, tensor)
    plan.run(paths, threads)
    return state


@dataclass(frozen=True)
class VerifyReport:
    path: str
    tensors: int
    chunks: int
    stored_bytes: int
    raw_bytes: int


def verify(path, *, threads: int | None = None, storage_options: dict | None = None
           ) -> VerifyReport:
    """Check the manifest, every file's size and every chunk's checksum and decoding.

    Raises:
        CheckpointError subclasses naming the file, tensor and chunk at fault.
    """
    storage, name = open_checkpoint(path, storage_options)
    m = open_manifest(storage, name)
    paths = data_paths(storage, name, m)
    plan = ReadPlan(m)
    plan.verify_all()
    plan.run(paths, threads)
    chunks = [c for e in m.tensors.values() for s in e.shards for c in s.chunks]
    return VerifyReport(storage.local_path(name), len(m.tensors), len(chunks),
                        sum(c.length for c in chunks),
                        sum(c.count * m.tensors[k].dtype.itemsize for k, e in m.tensors.items()
                            for s in e.shards for c in s.chunks))
