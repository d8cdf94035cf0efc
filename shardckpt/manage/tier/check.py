"""What the local tier may trust: the bytes of its data files against a manifest, and a local
copy against the job it belongs to (FORMAT.md 4.4).

Bytes: a file promoted to the durable tier and a replica received from a peer are checked
before anything that holds them commits: size, header, and every chunk's checksum and decoding
(the load's own checks), so neither tier ever commits a file that would fail its load.

Job: each local manifest records, under the metadata key ``shardckpt.local``, the durable root
its job saves to (its URL) and the job id stored in that root (``.shardckpt-job``, made by the
first manager on the root). A restore uses only copies recorded with its own pair: a local
folder left by another job, by a job on another durable root, or by a shardckpt before this
record existed, is ignored with a warning and never used to repair a good copy.
"""

from __future__ import annotations

import json
import os
import secrets

import numpy as np

from ... import knobs
from ...format import manifest as manifest_mod
from ...errors import CheckpointError, StorageError
from ...format.opening import LazySources
from ...load import backend_request, read_file_chunks
from ...codecs.status import raise_for
from ...types import MANIFEST_NAME, ChunkRead, ChunkRef, Manifest

JOB_KEY = "shardckpt.local"  # the local manifests' metadata key: {"root": url, "job": hex}
JOB_FILE = ".shardckpt-job"  # in the durable root: the job id, 32 hex digits and a newline


def check_files(storage, name: str, m: Manifest, indices) -> None:
    """Check data files ``indices`` of ``m`` as stored under ``name`` of ``storage``: present,
    the manifest's size, the format's header, every chunk's checksum and decoding.

    Raises:
        CorruptCheckpointError naming the file (and tensor and chunk) at fault;
        UnsafeCheckpointError for a path that leaves the folder; StorageError.
    """
    wanted = set(indices)
    if not wanted:
        return
    reads = _reads(m, wanted)
    sources = LazySources(storage, name, m)
    threads = knobs.get("read_threads") or os.cpu_count() or 1
    for i in sorted(wanted):
        planned = reads.get(i, [])
        source = sources[i]  # size and header
        status = read_file_chunks(source, [backend_request(r) for r in planned], threads)
        raise_for(status, file=f"{storage.url(name)}/{m.files[i].path}",
                  describe=lambda k, planned=planned: (planned[k].tensor,
                                                       planned[k].chunk_index))


def _reads(m: Manifest, wanted: set) -> dict[int, list[ChunkRead]]:
    """Verify-only reads of every chunk stored in the files ``wanted``, by file."""
    kinds = manifest_mod.chain_kinds(m)
    out: dict[int, list[ChunkRead]] = {}
    for key, entry in m.tensors.items():
        rows = entry.chunks
        for i in np.flatnonzero(np.isin(rows[:, 0], list(wanted))):
            c = ChunkRef(*rows[i].tolist())
            shard = int(np.searchsorted(entry.first, i, side="right")) - 1
            kind, shuffle = kinds[c.codec]
            out.setdefault(c.file, []).append(ChunkRead(
                c, c.count * entry.dtype.itemsize, kind, shuffle, 0, key,
                int(i) - int(entry.first[shard])))
    return out


def job_identity(storage) -> dict:
    """``{"root": url, "job": id}`` of the durable root ``storage``: the id read from its
    ``JOB_FILE``, which is created when missing (exclusively: of two racing managers the first
    wins; an empty file, a crash between its creation and its write, is written again). Call
    it on one rank and share the answer."""
    job = _read_job(storage)
    if not job:
        try:
            storage.write(JOB_FILE, f"{secrets.token_hex(16)}\n".encode(), durable=True,
                          exclusive=job is None)
        except OSError:
            pass  # another manager made it first, or the write failed: the read tells
        job = _read_job(storage)
        if not job:
            raise CheckpointError(f"{storage.url(JOB_FILE)}: cannot create the job id that "
                                  "binds the local tier to this durable root")
    return {"root": storage.url(""), "job": job}


def _read_job(storage) -> str | None:
    """The job id in ``JOB_FILE``; None when there is none, "" when the file is empty."""
    try:
        text = storage.read(JOB_FILE, 0, 256).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(exc.errno, f"{storage.url(JOB_FILE)}: {exc.strerror or exc}") \
            from exc
    if text and (len(text) != 32 or any(ch not in "0123456789abcdef" for ch in text)):
        raise CheckpointError(f"{storage.url(JOB_FILE)}: not a shardckpt job id "
                              f"({text[:40]!r}); it binds the local tier to this root")
    return text


def recorded_job(storage, name: str):
    """The job identity recorded in the local checkpoint ``name`` (None when it has none), read
    with a plain JSON parse: a filter only; the restore checks the whole manifest later."""
    try:
        doc = json.loads(storage.read(f"{name}/{MANIFEST_NAME}", 0,
                                      manifest_mod.MAX_MANIFEST_BYTES))
        return (doc.get("metadata") or {}).get(JOB_KEY)
    except (OSError, ValueError, AttributeError):
        return None
