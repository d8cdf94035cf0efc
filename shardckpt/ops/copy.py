"""Copy one checkpoint anywhere, materialising what it references (``shardckpt copy``).

An incremental checkpoint is self-describing only inside its root: some of its chunks live in
earlier checkpoints there (FORMAT.md 3.6). A copy taken out of the root therefore brings every
file the checkpoint uses, its own and the referenced ones (renamed ``data/ref-NNNNN.bin``), and
writes a manifest without references. The copy commits like a save (temporary folder and rename,
or manifest last on object stores), so an interrupted copy leaves no checkpoint behind.

Any legal name may be an own file's, ``data/ref-00001.bin`` included, so a referenced file's new
name is chosen against every name already taken. Before the commit the new manifest is parsed
back and every chunk of the copy is read where it landed and checked (CRC-32C and decoding), as
``verify`` would: a copy commits only a checkpoint that loads. Replacing a checkpoint that others
use as their base is refused, as ``save(..., overwrite=True)`` refuses it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

from ..format import manifest as manifest_mod, retire
from ..save import commit_for, refuse_to_clobber
from ..errors import CheckpointExistsError
from ..load import ReadPlan
from ..format.opening import RemoteFile, data_sources, open_for_read
from ..storage import open_checkpoint, storage_error
from ..types import DATA_DIR


def _targets(files) -> list[str]:
    """Each file's path in the copy: its own path, or for a referenced file
    ``data/ref-NNNNN.bin`` (NNNNN: its index in ``files``), with ``.K`` before ``.bin`` when an
    own file already has that name."""
    taken = {f.path for f in files if f.base is None}
    out = []
    for i, f in enumerate(files):
        path, k = f.path, 0
        if f.base is not None:
            path = f"{DATA_DIR}/ref-{i:05d}.bin"
            while path in taken:
                k += 1
                path = f"{DATA_DIR}/ref-{i:05d}.{k}.bin"
            taken.add(path)
        out.append(path)
    return out


def _checked(storage, tmp: str, where: str, copied) -> bytes:
    """The copy's manifest bytes, once they parse back to a complete manifest and every chunk
    of the files under ``tmp`` checks and decodes (CorruptCheckpointError or
    UnsafeCheckpointError otherwise)."""
    data = manifest_mod.to_json(copied)
    m = replace(manifest_mod.parse(data), name=where)
    manifest_mod.check_complete(m, where)
    plan = ReadPlan(m)
    plan.verify_all()
    plan.run(data_sources(storage, tmp, m))
    return data


def _overlap(a, b) -> bool:
    """Whether two ``(storage, name)`` pairs are one folder or one lies inside the other (by
    real path, or by URL)."""
    (sa, na), (sb, nb) = a, b
    la, lb = sa.local_path(na), sb.local_path(nb)
    if la is not None and lb is not None:
        la, lb = os.path.realpath(la), os.path.realpath(lb)
    else:
        la, lb = sa.url(na).rstrip("/"), sb.url(nb).rstrip("/")
    return la == lb or la.startswith(lb + "/") or lb.startswith(la + "/")


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
            first byte is copied), a chunk of the copy fails its checksum or decoding (nothing
            is committed), ``dst`` exists and ``overwrite`` is false, or ``dst`` is, holds or
            lies inside ``src``, or is a checkpoint that others reference
            (CheckpointExistsError).
    """
    m, sources = open_for_read(src, storage_options)
    storage, name = open_checkpoint(dst, dst_storage_options)
    if _overlap(open_checkpoint(src, storage_options), (storage, name)):
        raise CheckpointExistsError(f"{storage.url(name)}: a checkpoint cannot be copied onto "
                                    "itself, into itself, or over the folder holding it")
    tx = commit_for(storage, name, overwrite)
    if overwrite:  # never replace a checkpoint whose files others reference (nor a non-one)
        refuse_to_clobber(storage, name, overwrite)
        retire.check_replaceable(storage, name)
    tx.begin()
    try:
        files = []
        for f, source, path in zip(m.files, sources, _targets(m.files)):
            try:
                _copy_file(source, storage, tx.path(path), f.size)
            except OSError as exc:
                raise storage_error(exc, f"copying {f.location if f.base else f.path}") from exc
            files.append(replace(f, path=path, base=None))
        copied = replace(m, files=tuple(files))
        tx.commit(_checked(storage, tx.tmp, storage.url(name), copied))
    finally:
        tx.close()
    return {"files": len(files), "bytes": sum(f.size for f in files),
            "materialised": sum(f.base is not None for f in m.files)}
