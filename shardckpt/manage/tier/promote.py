"""Promotion: a durable checkpoint made from a committed local one, without staging the state
again. Each rank copies its own encoded data files from its node's folder to the durable
storage; rank 0 commits the local checkpoint's manifest there (the same bytes), with the
durable tier's commit protocol (FORMAT.md 4). Needs the ranks that saved the local step.

Every byte is checked before the commit (check.py): a local file damaged after its own
commit (a flipped bit, a cut tail) would otherwise become a durable checkpoint that cannot load,
and the manager's retention would then delete the last one that can. On a file system the
copies are read back and checked where they will be committed; on an object store each source
file is checked before its upload and the object's size and header after it. Any failure
fails the promotion on every rank, nothing is committed, and the manager saves the state
instead.
"""

from __future__ import annotations

import os
import shutil

from ... import knobs
from ...save import commit_for, upload_parts
from ...format import retire
from ...dist.rounds import exchange
from ...errors import CheckpointError
from ..layout import step_name
from ...format.opening import LazySources, open_manifest
from ...storage import storage_error
from ...types import MANIFEST_NAME
from .check import check_files


def _copy(src: str, storage, dst: str) -> None:
    """One file from the node's folder to ``dst`` of the durable storage, made durable."""
    local = storage.local_path(dst)
    try:
        if local is not None:
            shutil.copyfile(src, local)
            fd = os.open(local, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        block = knobs.get("upload_part_bytes")

        def parts():
            with open(src, "rb") as f:
                while data := f.read(block):
                    yield data
        upload_parts(storage, dst, parts())
    except OSError as exc:
        raise storage_error(exc, f"promoting {src}") from exc


def _copy_checked(tier, step: int, m, rank: int, storage, tmp: str) -> None:
    """Copy ``rank``'s files of local ``step`` into ``tmp`` of the durable storage, each
    checked against the manifest ``m`` (module docstring)."""
    folder = tier.path(step)
    mine = [i for i, f in enumerate(m.files) if f.rank == rank]
    local = storage.local_path(tmp) is not None
    if not local:
        check_files(tier.storage, step_name(step), m, mine)
    paths = [m.files[i].path for i in mine]
    paths += [i.path for i in m.indexes or () if i.rank == rank]  # FORMAT.md 3.7
    for path in paths:
        _copy(os.path.join(folder, path), storage, f"{tmp}/{path}")
    if local:
        check_files(storage, tmp, m, mine)
    else:
        sources = LazySources(storage, tmp, m)
        for i in mine:
            sources[i]  # noqa: B018 - the object's size and header, checked on first use


def promote(tier, step: int, storage, name: str) -> None:
    """Copy local ``step`` to ``name`` of ``storage`` and commit it there (collective).

    Raises CheckpointError (RankFailureError on the other ranks) when any rank lacks its files
    or a copy fails; nothing is committed then and an older checkpoint ``name`` stays as it was.
    """
    ex = exchange(None)
    tx = commit_for(storage, name, overwrite=True) if ex.rank == 0 else None
    folder = tier.path(step)
    try:
        error, m = None, None
        try:
            m = open_manifest(tier.storage, step_name(step))
            if m.world_size != ex.world:
                raise CheckpointError(f"{folder}: saved by {m.world_size} ranks, {ex.world} now")
        except CheckpointError as exc:
            error = exc

        def begin(_):
            retire.check_replaceable(storage, name)  # never replace a referenced checkpoint
            tx.begin()
            return {"tmp": tx.tmp}
        answer = ex.round("promote-begin", True, error, tx and begin)
        error = None
        try:
            _copy_checked(tier, step, m, ex.rank, storage, answer["tmp"])
        except (OSError, CheckpointError) as exc:
            error = exc
        manifest = tier.storage.read(f"{step_name(step)}/{MANIFEST_NAME}") \
            if ex.rank == 0 else b""
        ex.round("promote-copy", True, error, tx and (lambda _: tx.commit(manifest)))
    finally:
        if tx is not None:
            tx.close()
