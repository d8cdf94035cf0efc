"""Promotion: a durable checkpoint made from a committed local one, without staging the state
again. Each rank copies its own encoded data files from its node's folder to the durable
storage; rank 0 commits the local checkpoint's manifest there (the same bytes), with the
durable tier's commit protocol (FORMAT.md 4). Needs the ranks that saved the local step.
"""

from __future__ import annotations

import os
import shutil

from .. import knobs, remote_io, retire
from ..commit import commit_for
from ..dist import exchange
from ..errors import CheckpointError
from .layout import step_name
from ..read import open_manifest
from ..storage import storage_error
from ..types import MANIFEST_NAME


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
        remote_io.upload(storage, dst, parts())
    except OSError as exc:
        raise storage_error(exc, f"promoting {src}") from exc


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
            mine = [f.path for f in m.files if f.rank == ex.rank]
            mine += [i.path for i in m.indexes or () if i.rank == ex.rank]  # FORMAT.md 3.7
            for path in mine:
                _copy(os.path.join(folder, path), storage, f"{answer['tmp']}/{path}")
        except (OSError, CheckpointError) as exc:
            error = exc
        manifest = tier.storage.read(f"{step_name(step)}/{MANIFEST_NAME}") \
            if ex.rank == 0 else b""
        ex.round("promote-copy", True, error, tx and (lambda _: tx.commit(manifest)))
    finally:
        if tx is not None:
            tx.close()
