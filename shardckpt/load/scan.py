"""Full verification that reports every fault of a checkpoint, not just the first.

``ReadPlan.run`` stops at the first bad chunk, which is right for a load (the load fails anyway)
but not for a health check: an operator deciding whether to resume, or which files to restore
from a backup, wants the whole list. The codec backend stops a file at its first failure and,
with several threads, cannot say which other chunks of the file it had checked, so after a
failure the chunks on either side are checked again. Reads go in batches of a bounded size,
which bounds that re-reading and lets a caller show progress.
"""

from __future__ import annotations

import os
from typing import Callable

from .. import knobs
from ..format import opening
from ..errors import CheckpointError, UnsafeCheckpointError
from .read import ReadPlan, backend_request, read_file_chunks
from ..format.opening import check_data_file, check_inside, file_label
from ..codecs.status import OK, raise_for
from ..storage import Storage
from ..types import ChunkRead, Manifest

BATCH_BYTES = 64 << 20


def scan(storage: Storage, name: str, m: Manifest, *, threads: int | None = None,
         progress: Callable[[int], None] | None = None,
         batch_bytes: int = BATCH_BYTES) -> list[CheckpointError]:
    """Check every data file and every chunk of a checkpoint whose manifest ``m`` parsed.

    Args:
        storage, name: where the checkpoint lives (the folder ``name`` of ``storage``).
        threads: decoding threads per batch (default: knob ``read_threads``, 0 = all cores).
        progress: called with the stored bytes of each batch once it has been checked.
        batch_bytes: the stored bytes handed to the backend at once.

    Returns:
        every fault found, each a CheckpointError (usually CorruptCheckpointError with ``file``,
        ``tensor`` and ``chunk``), in file order; empty when the checkpoint is sound.
    """
    threads = knobs.get("read_threads") if threads is None else threads
    threads = threads or os.cpu_count() or 1
    local = storage.local_path(name)
    root = os.path.realpath(local) if local is not None else None
    unsafe = _unsafe_paths(root, m) if root is not None else []
    if unsafe:  # a hostile checkpoint: report it without opening any of its data files
        return unsafe
    plan = ReadPlan(m)
    plan.verify_all()
    faults: list[CheckpointError] = []
    for index, entry in enumerate(m.files):
        reads = plan.by_file.get(index, [])
        try:
            path = (check_data_file(root, entry) if root is not None
                    else opening.check_object(storage, name, entry))
        except CheckpointError as exc:
            faults.append(exc)  # its chunks cannot be checked: the file itself is at fault
            if progress:
                progress(sum(r.ref.length for r in reads))
            continue
        for batch in _batches(reads, batch_bytes):
            faults.extend(_check(path, file_label(m, entry), batch, threads))
            if progress:
                progress(sum(r.ref.length for r in batch))
    return faults


def _unsafe_paths(root: str, m: Manifest) -> list[CheckpointError]:
    """Every data file path that leads out of the checkpoint or to no regular file."""
    found = []
    for entry in m.files:
        try:
            if entry.base is None:
                check_inside(root, entry.path)
            else:  # a reference (FORMAT.md 3.6): it must stay under the root of both
                check_inside(os.path.dirname(root), entry.location, file_label(m, entry))
        except UnsafeCheckpointError as exc:
            found.append(exc)
    return found


def _batches(reads: list[ChunkRead], limit: int):
    """Consecutive runs of ``reads`` of at most ``limit`` stored bytes (at least one read)."""
    batch, size = [], 0
    for r in reads:
        if batch and size + r.ref.length > limit:
            yield batch
            batch, size = [], 0
        batch.append(r)
        size += r.ref.length
    if batch:
        yield batch


def _check(path, file: str, reads: list[ChunkRead], threads: int) -> list[CheckpointError]:
    """Every fault among ``reads`` of one file."""
    found: list[tuple[int, CheckpointError]] = []  # (offset in the file, fault)
    pending = [reads]
    while pending:
        group = pending.pop()
        if not group:
            continue
        status = read_file_chunks(path, [backend_request(r) for r in group], threads)
        if status[0] == OK:
            continue
        try:
            raise_for(status, file=file, describe=lambda i, g=group: (g[i].tensor,
                                                                      g[i].chunk_index))
        except CheckpointError as exc:
            found.append((group[status[2]].ref.offset if status[2] >= 0 else -1, exc))
        bad = status[2]
        if bad < 0:
            break  # the file as a whole failed (an IO error): its chunks tell nothing more
        # Chunks before the bad one may have been skipped by the other threads: check again.
        pending += [group[bad + 1:], group[:bad]]
    return [exc for _, exc in sorted(found, key=lambda f: f[0])]
