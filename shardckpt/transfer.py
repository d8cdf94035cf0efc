"""Copy one checkpoint anywhere, materialising what it references (``shardckpt copy``).

An incremental checkpoint is self-describing only inside its root: some of its chunks live in
earlier checkpoints there (FORMAT.md 3.6). A copy taken out of the root therefore brings every
file the checkpoint uses, its own and the referenced ones (renamed ``data/ref-NNNNN.bin``), and
writes a manifest without references. The copy commits like a save (temporary folder and rename,
or manifest last on object stores), so an interrupted copy leaves no checkpoint behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

from . import manifest as manifest_mod
from .commit import commit_for
from .read import open_for_read
from .remote_io import RemoteFile
from .storage import open_checkpoint, storage_error
from .types import DATA_DIR


def _target(i: int, f) -> str:
    return f.path if f.base is None else f"{DATA_DIR}/ref-{i:05d}.bin"


def _copy_file(source, storage, dest: str, size: int) -> None:
    """Copy one checked data file (a real path or a RemoteFile) to ``dest`` of ``storage``."""
    local = storage.local_path(dest)
    if isinstance(source, str) and local is not None:
        shutil.copyfile(source, local)
        with open(local, "rb+") as fh:
            os.fsync(fh.fileno())
        return
    if isinstance(source, RemoteFile):
        data = source.storage.read(source.path, 0, size)
    else:
        with open(source, "rb") as fh:
            data = fh.read()
    storage.write(dest, data, durable=True, exclusive=False)


def copy_checkpoint(src, dst, *, overwrite: bool = False, storage_options: dict | None = None,
                    dst_storage_options: dict | None = None) -> dict:
    """Copy checkpoint ``src`` to ``dst`` (any folder or URL) as a checkpoint that references
    nothing; returns ``{"files", "bytes", "materialised"}`` (materialised: referenced files
    brought in).

    Raises:
        CheckpointError subclasses: ``src`` fails its checks (every file is checked before the
            first byte is copied), or ``dst`` exists and ``overwrite`` is false.
    """
    m, sources = open_for_read(src, storage_options)
    storage, name = open_checkpoint(dst, dst_storage_options)
    tx = commit_for(storage, name, overwrite)
    tx.begin()
    try:
        files = []
        for i, (f, source) in enumerate(zip(m.files, sources)):
            path = _target(i, f)
            try:
                _copy_file(source, storage, tx.path(path), f.size)
            except OSError as exc:
                raise storage_error(exc, f"copying {f.location if f.base else f.path}") from exc
            files.append(replace(f, path=path, base=None))
        copied = replace(m, files=tuple(files))
        tx.commit(manifest_mod.to_json(copied))
    finally:
        tx.close()
    return {"files": len(files), "bytes": sum(f.size for f in files),
            "materialised": sum(f.base is not None for f in m.files)}
