"""The front door: ``save``, ``load``, ``load_full``, ``verify`` (``async_save`` lives with the
save pipeline), documented here and run by the pipelines in ``save/`` and ``load/``."""

from __future__ import annotations

import time
from typing import Any

from .format.opening import open_for_read, open_manifest
from .save.incremental import base_name
from .format.safetensors import is_hf_folder
from .load import hf, pipeline
from .load.read import ReadPlan
from .load.scan import scan
from .observe import log_save
from .save.pipeline import check_metadata, run_save
from .storage import open_checkpoint
from .types import SaveInfo, VerifyReport
from .save.write import WriteOptions

__all__ = ["save", "load", "load_full", "verify", "SaveInfo", "VerifyReport", "check_metadata"]


def save(state: Any, path, *, codec: str | None = None, level: int | None = None,
         metadata: dict | None = None, overwrite: bool = False, durable: bool = True,
         storage_options: dict | None = None, timeout: float | None = None,
         base=None, **tuning) -> SaveInfo:
    """Save ``state`` as a checkpoint folder at ``path``, atomically.

    Collective when a process group of several ranks is initialized: every rank calls it with
    its own state (DTensors hold their local shards; plain tensors are taken as replicated and
    written once, except where ranks' copies differ); each rank writes its own data file and
    rank 0 commits once all are durable.

    Args:
        state: nested dicts / lists / tuples of tensors, ints, floats, strs, bools, None,
            dtypes, and objects with ``state_dict()`` / ``load_state_dict()``.
        path: the checkpoint folder (created; its parent must exist), or an fsspec URL
            (``s3://bucket/run/step-100``, ``gs://``, ``az://``, ``memory://``) where the
            manifest, written last, is the commit marker (FORMAT.md 4.2).
        codec: ``"auto"`` (default), ``"zstd"`` or ``"raw"`` (see knobs.py).
        level: zstd level (default 1; negative = faster).
        metadata: a JSON-able dict stored in the manifest.
        overwrite: replace an existing checkpoint instead of raising (atomically on local
            disks; on object stores the old one is deleted first, see FORMAT.md 4.2).
        durable: fsync data and manifest before the commit (leave on outside benchmarks).
        storage_options: passed to fsspec for URLs (credentials, ``endpoint_url``...).
        timeout: seconds to wait for the slowest rank (default: knob ``dist_timeout``).
        base: an incremental save: a committed checkpoint under the same parent (its name or
            path). Chunks whose content (xxh3-128 of the raw bytes) it already stores are
            referenced, not written (FORMAT.md 3.6); loading needs nothing beyond the root.
        **tuning: ``chunk_bytes``, ``pool_bytes``, ``encode_threads``, ``write_threads``,
            ``files_per_rank`` (knobs.py); ``content_hashes=True`` records chunk hashes
            without a base, so that later saves can reference this one.

    Returns:
        SaveInfo with this rank's sizes and the pipeline's statistics.

    Raises:
        UnsupportedValueError: a value cannot be saved without pickling (its path is named).
        CheckpointExistsError: ``path`` holds a checkpoint and ``overwrite`` is false, or
            other checkpoints reference its files.
        UnsafeCheckpointError: ``base`` lies under another root.
        DiskFullError, StorageError: writing failed; nothing was committed.
        RankFailureError: (several ranks) any rank failed; raised on every rank, nothing was
            committed.
    """
    t0 = time.perf_counter()
    opts = WriteOptions.resolve(codec=codec, level=level, durable=durable, **tuning)
    metadata = check_metadata(metadata)
    storage, name = open_checkpoint(path, storage_options)
    base = base_name(storage, name, base, storage_options)
    report = run_save(state, storage, name, opts, metadata, overwrite, timeout, base)
    info = SaveInfo.from_report(storage.url(name), report, time.perf_counter() - t0)
    log_save(info.path, info.raw_bytes, info.stored_bytes, info.seconds, stall=info.seconds)
    return info


def load(state: Any, path, *, strict: bool = True, per_rank: str = "error",
         threads: int | None = None, timeout: float | None = None,
         storage_options: dict | None = None, key_map=None) -> Any:
    """Load a checkpoint, or a Hugging Face weights folder, into ``state`` in place and return it.

    Tensors are filled in place (same global shape and dtype; any device; a DTensor receives
    just its local shard, whatever the saving world size and layout were); non-tensor leaves are
    replaced; objects with ``load_state_dict`` receive their loaded state dict. Optimizers that
    have no state yet gain it from the checkpoint. With several ranks every rank calls it; each
    reads only the chunks that overlap its shards, and all ranks agree on success. Bytes several
    ranks need (the manifest, replicated tensors, chunks straddling new shards) are read from
    storage by one rank and handed to the others through shared memory on its node and over gloo
    across nodes (share.py; knob ``share_reads``).

    Args:
        strict: report keys missing from either side (else they are skipped).
        per_rank: values that differed between the saving ranks (data position, RNG) load as
            saved when the world size is unchanged. Otherwise ``"error"`` (default) raises
            StateMismatchError naming them, ``"rank0"`` gives every rank saved rank 0's values,
            ``"modulo"`` gives rank r saved rank r % N's values.
        key_map: (HF folders only) how the folder's tensor names become the state's dotted
            names: None (as they are), a prefix string (``"model."`` for ``{"model": model}``;
            only targets under it are expected), a ``{folder prefix: target prefix}`` dict, or
            a callable (returning None skips a tensor).

    A local folder holding ``model.safetensors`` or ``model.safetensors.index.json`` (and no
    manifest) is read as HF weights (load/hf.py): the state's modules, dicts and lists are named
    by dotted paths; each rank reads only the byte ranges of its DTensor slices; floating
    tensors are cast to the target's dtype; ``per_rank`` and ``threads`` do not apply.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError: nothing committed at ``path``.
        StateMismatchError: every missing / unexpected key and shape or dtype difference at once;
            the target is untouched.
        CorruptCheckpointError, UnsafeCheckpointError: the checkpoint fails its checks. Tensors
            read before the fault may already hold checkpoint values; the files are untouched.
        RankFailureError: (several ranks) on the ranks whose own load succeeded, when another
            rank's failed.
    """
    if is_hf_folder(path):
        return hf.load_hf(state, path, key_map=key_map, strict=strict, timeout=timeout)
    if key_map is not None:
        raise TypeError(f"key_map applies to Hugging Face weights folders only; {path} is not one")
    return pipeline.load(state, path, strict=strict, per_rank=per_rank, threads=threads,
                         timeout=timeout, storage_options=storage_options)


def load_full(path, *, key: str | None = None, rank: int = 0, threads: int | None = None,
              storage_options: dict | None = None) -> Any:
    """The whole saved state with every tensor whole, on the CPU; no process group needed.

    A sharded checkpoint is consolidated; where saving ranks held different values, ``rank``
    picks whose (default 0). With ``key`` (``/``-separated dict keys, e.g. ``"model"``) only
    that subtree is returned, and only its chunks are read.

    Raises:
        StateMismatchError: the checkpoint has no ``key``. CheckpointError: as ``load``.
    """
    return pipeline.load_full(path, key=key, rank=rank, threads=threads,
                              storage_options=storage_options)


def verify(path, *, threads: int | None = None, storage_options: dict | None = None,
           collect: bool = False, progress=None) -> VerifyReport:
    """Check the manifest, every file's size and every chunk's checksum and decoding.

    Args:
        collect: keep going after a bad file or chunk and return every fault in
            ``VerifyReport.problems`` instead of raising the first. A manifest that does not
            parse is still raised: without it nothing else can be checked.
        progress: (collect mode) called with the stored bytes of each batch once checked.

    Raises:
        CheckpointError subclasses naming the file, tensor and chunk at fault (in collect mode
        only those about the checkpoint as a whole: missing, uncommitted, bad manifest).
    """
    storage, name = open_checkpoint(path, storage_options)
    if collect:
        m = open_manifest(storage, name)
        problems = tuple(scan(storage, name, m, threads=threads, progress=progress))
    else:
        m, paths = open_for_read(path, storage_options)
        plan = ReadPlan(m)
        plan.verify_all()
        plan.run(paths, threads)
        problems = ()
    tensors = m.tensors.values()
    return VerifyReport(storage.url(name), len(m.tensors),
                        sum(len(e.chunks) for e in tensors),
                        sum(int(e.chunks[:, 2].sum()) for e in tensors),
                        sum(int(e.chunks[:, 4].sum()) * e.dtype.itemsize for e in tensors),
                        problems)
