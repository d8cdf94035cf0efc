"""The public calls: ``save``, ``load``, ``load_full``, ``verify``.

Each is a short pipeline over the stage modules. Save (saver): flatten (tree) -> plan (plan) ->
encode + write (write) -> manifest + commit (commit), in rounds among the ranks (dist). Load:
manifest (read) -> match the target (place) -> plan reads, fetch, decode into place (read) ->
apply, then the ranks agree on the outcome.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from . import share
from .dist.rounds import exchange
from .observe import log_load, log_save
from .incremental import base_name
from .errors import StateMismatchError, UnsupportedValueError
from .place import match
from .read import ReadPlan, read_blob
from .format.opening import open_for_read, open_manifest
from .scan import scan
from .saver import run_save
from .storage import open_checkpoint
from .format.tree import build, dict_items, node_kind, path_text, with_overrides
from .types import HEADER_BYTES, Manifest
from .write import WriteOptions


@dataclass(frozen=True)
class SaveInfo:
    """What a save wrote."""

    path: str
    tensors: int
    raw_bytes: int
    stored_bytes: int
    seconds: float
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_report(cls, path: str, report: dict, seconds: float) -> "SaveInfo":
        """From this rank's write report (saver.write_rank)."""
        stored = sum(f["size"] - HEADER_BYTES for f in report["files"])
        return cls(path, report["tensors"], report["raw_bytes"], stored, seconds,
                   report.get("stats", {}))


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
    metadata = _check_metadata(metadata)
    storage, name = open_checkpoint(path, storage_options)
    base = base_name(storage, name, base, storage_options)
    report = run_save(state, storage, name, opts, metadata, overwrite, timeout, base)
    info = SaveInfo.from_report(storage.url(name), report, time.perf_counter() - t0)
    log_save(info.path, info.raw_bytes, info.stored_bytes, info.seconds, stall=info.seconds)
    return info


def load(state: Any, path, *, strict: bool = True, per_rank: str = "error",
         threads: int | None = None, timeout: float | None = None,
         storage_options: dict | None = None) -> Any:
    """Load a checkpoint into ``state`` in place and return it.

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

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError: nothing committed at ``path``.
        StateMismatchError: every missing / unexpected key and shape or dtype difference at once;
            the target is untouched.
        CorruptCheckpointError, UnsafeCheckpointError: the checkpoint fails its checks. Tensors
            read before the fault may already hold checkpoint values; the files are untouched.
        RankFailureError: (several ranks) on the ranks whose own load succeeded, when another
            rank's failed.
    """
    t0 = time.perf_counter()
    ex = exchange(timeout)
    sharing = share.enabled(ex.world, path)
    error = plan = paths = session = None
    try:
        if sharing:
            session = share.Session(ex.rank, ex.world, ex.timeout)
        m, paths = (session.open_manifest(path, storage_options) if sharing
                    else open_for_read(path, storage_options))
        result, placement = match(state, m, tree_for(m, ex.rank, ex.world, per_rank), strict,
                                  blob=partial(read_blob, m, paths))
        if placement.missing or placement.unexpected or placement.mismatched:
            raise StateMismatchError(placement.missing, placement.unexpected,
                                     placement.mismatched)
        plan = _read_plan(m, placement)
    except Exception as exc:
        error = exc
    try:
        if sharing:  # every rank learns who reads which shared chunk, or raises: a rank failed
            decision = ex.round("needs", None if error else share.needs(plan), error,
                                session.assign if session else None, raise_own=True)
        if error is None:
            error = _fill(plan, placement, paths, threads,
                          (session, share.SharedPlan(decision, ex.rank)) if sharing else None)
        # A rank whose collective broke reports it; the round names the rank that went silent.
        ex.round("load", True, error, lambda _: True,
                 raise_own=not isinstance(error, share.ShareLostError))
    except Exception:
        if sharing:
            share.forget()  # every rank raised in the same round: all drop the gloo group
            if session is not None:
                session.close(failed=True)
        raise
    if session is not None:
        session.close()  # after the last round: no local rank still maps the node's files
    log_load(str(path), plan, time.perf_counter() - t0)
    return result


def _fill(plan: ReadPlan, placement, paths, threads, shared) -> Exception | None:
    """Fetch, decode and place every planned chunk (the shared ones first, when ``shared`` is
    ``(share.Session, SharedPlan)``); the error that stopped it, or None."""
    try:
        if shared:
            session, decision = shared
            session.fetch(plan, decision, paths, threads)
        plan.run(paths, threads)
        placement.apply()
    except Exception as exc:
        return exc
    return None


def _read_plan(m: Manifest, placement) -> ReadPlan:
    """The chunk reads that fill every target of ``placement``."""
    plan, planned = ReadPlan(m), set()
    for key, target in placement.fills:
        ident = (key, target.device, target.data_ptr(), target.stride())
        if ident not in planned:  # tied weights: the same memory is filled once
            planned.add(ident)
            plan.into(key, target)
    for key, fresh in placement.new.items():
        plan.into(key, fresh)
    return plan


def tree_for(m: Manifest, rank: int, world: int, per_rank: str):
    """The saved tree this rank loads (FORMAT.md 3.5), by the ``per_rank`` rule."""
    if per_rank not in ("error", "rank0", "modulo"):
        raise ValueError(f"per_rank must be 'error', 'rank0' or 'modulo', not {per_rank!r}")
    if not m.rank_overrides:
        return m.tree
    if world != m.world_size and per_rank == "error":
        why = (f"differs between the {m.world_size} saving ranks and this load runs on {world};"
               " pass per_rank='rank0' or per_rank='modulo', or leave it out of the state")
        paths = dict.fromkeys(path_text(path) for _, own in m.rank_overrides for path, _ in own)
        raise StateMismatchError(mismatched=[(p, why) for p in paths])
    source = rank if world == m.world_size else 0 if per_rank == "rank0" else \
        rank % m.world_size
    return saved_tree(m, source)


def saved_tree(m: Manifest, rank: int):
    """Saving rank ``rank``'s tree: the manifest's tree with that rank's overrides."""
    if not 0 <= rank < m.world_size:
        raise ValueError(f"rank {rank} is not among the {m.world_size} saving ranks")
    own = dict(m.rank_overrides or ()).get(rank, [])
    return with_overrides(m.tree, own)


def load_full(path, *, key: str | None = None, rank: int = 0, threads: int | None = None,
              storage_options: dict | None = None) -> Any:
    """The whole saved state with every tensor whole, on the CPU; no process group needed.

    A sharded checkpoint is consolidated; where saving ranks held different values, ``rank``
    picks whose (default 0). With ``key`` (``/``-separated dict keys, e.g. ``"model"``) only
    that subtree is returned, and only its chunks are read.

    Raises:
        StateMismatchError: the checkpoint has no ``key``. CheckpointError: as ``load``.
    """
    t0 = time.perf_counter()
    m, paths = open_for_read(path, storage_options)
    node = _subtree(saved_tree(m, rank), key)
    plan, made = ReadPlan(m), {}

    def tensor(k):
        if k not in made:
            entry = m.tensors[k]
            made[k] = t = torch.empty(entry.shape, dtype=entry.dtype.torch)
            plan.into(k, t)
        return made[k]

    state = build(node, tensor, blob=partial(read_blob, m, paths))
    plan.run(paths, threads)
    log_load(str(path), plan, time.perf_counter() - t0)
    return state


def _subtree(node, key: str | None):
    for part in key.split("/") if key else ():
        kind, payload = node_kind(node)
        children = dict(dict_items(payload)) if kind == "dict" else {}
        if part not in children:
            raise StateMismatchError(missing=[key])
        node = children[part]
    return node


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked; ``problems`` lists the faults found in collect mode."""

    path: str
    tensors: int
    chunks: int
    stored_bytes: int
    raw_bytes: int
    problems: tuple = ()

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.problems


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
