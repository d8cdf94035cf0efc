"""Translate the codec backend's status tuples into the typed errors of ``errors.py``.

The native core and the reference codec report ``(code, message, chunk, errno)``; this is the one
place that knows what the codes mean (csrc/core/pipeline.h ``Code``).
"""

from __future__ import annotations

from ..errors import CheckpointError, CorruptCheckpointError, DiskFullError, StorageError

OK, INVALID, IO_ERROR, NO_SPACE, CHECKSUM, DECODE, TRUNCATED = range(7)


def raise_for(status, *, file: str, describe=None) -> None:
    """Raise the typed error for a failed status; ``describe(chunk) -> (tensor, chunk_in_shard)``
    names the tensor and chunk at fault."""
    code, message, chunk, err = status
    if code == OK:
        return
    tensor, index = describe(chunk) if describe and chunk >= 0 else (None, None)
    if code == NO_SPACE:
        raise DiskFullError(f"{file}: disk full while writing ({message})")
    if code == IO_ERROR:
        raise StorageError(err or None, f"{file}: {message}")
    if code in (CHECKSUM, DECODE, TRUNCATED, INVALID):
        what = {CHECKSUM: "checksum mismatch", DECODE: "chunk does not decode",
                TRUNCATED: "file is truncated", INVALID: "invalid chunk"}[code]
        raise CorruptCheckpointError(f"{what}: {message}", file=file, tensor=tensor, chunk=index)
    raise CheckpointError(f"{file}: codec backend failed with code {code}: {message}")
