"""The one exception hierarchy shardckpt raises.

Every failure derives from :class:`CheckpointError` (an ``Exception``, so ``except Exception``
catches it, unlike DCP's ``BaseException``-derived error) and also from the stdlib type that fits,
so callers may catch either. Errors about checkpoint contents name the file, tensor and chunk.
"""

from __future__ import annotations

import errno as _errno


class CheckpointError(Exception):
    """Root of every error shardckpt raises."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint exists at the given path."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint already exists where a save was asked not to overwrite one."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """The path exists but was never committed (no manifest): an interrupted or foreign save."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """Stored bytes or metadata fail their checks (checksum, size, decoding, JSON).

    Attributes:
        file: the checkpoint-relative file at fault, if known.
        tensor: the tensor key at fault, if known.
        chunk: the chunk index within the tensor's shard, if known.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None,
                 chunk: int | None = None):
        where = ", ".join(f"{k}={v!r}" for k, v in
                          (("file", file), ("tensor", tensor), ("chunk", chunk)) if v is not None)
        super().__init__(f"{message} [{where}]" if where else message)
        self.file, self.tensor, self.chunk = file, tensor, chunk


class UnsafeCheckpointError(CheckpointError, ValueError):
    """The manifest asks for something a safe reader refuses: a path outside the checkpoint,
    a negative or absurd size, an unknown codec or format version."""


class MetadataBudgetError(UnsafeCheckpointError, MemoryError):
    """The manifest and its index files declare more decoded tables and grid cells than the
    memory budget over the bytes on disk allows (FORMAT.md 5); refused before any of it is
    decoded, so a small hostile file cannot make a reader allocate gigabytes."""


class StateMismatchError(CheckpointError, ValueError):
    """The target state does not match the checkpoint.

    Attributes:
        missing: keys the target has and the checkpoint lacks.
        unexpected: keys the checkpoint has and the target lacks.
        mismatched: ``(key, reason)`` pairs for shape, dtype or type differences.
    """

    def __init__(self, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.mismatched = list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"missing from checkpoint: {self.missing}")
        if self.unexpected:
            parts.append(f"unexpected in checkpoint: {self.unexpected}")
        if self.mismatched:
            parts.append("mismatched: " + "; ".join(f"{k}: {r}" for k, r in self.mismatched))
        hint = ""
        if (self.missing or self.unexpected) and not self.mismatched:
            hint = (" (load(..., strict=False) fills what both have and leaves the rest; "
                    "CheckpointManager.restore takes strict=False too)")
        super().__init__("state does not match checkpoint: " + " | ".join(parts) + hint)


class DataPositionError(StateMismatchError):
    """A saved data position (``shardckpt.data.DistributedSampler``) would name other samples in
    this run: another dataset length, seed or ``shuffle``, or a world size that does not split
    the checkpoint's global batch. A ``StateMismatchError``, so a restore stops rather than fall
    back to an older checkpoint that has the same problem."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A value in the state cannot be saved without pickling (named by its path)."""


class RankFailureError(CheckpointError, RuntimeError):
    """One or more ranks failed a collective save or load; raised on every rank.

    Attributes:
        failures: ``{rank: exception}``; this rank's own entry is the real exception object,
            other ranks' entries describe what they raised (or that they never reported).
    """

    def __init__(self, failures: dict):
        self.failures = dict(sorted(failures.items()))
        lines = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in self.failures.items())
        super().__init__(f"{len(self.failures)} rank(s) failed, nothing was committed: {lines}")


class StorageError(CheckpointError, OSError):
    """Reading or writing the storage failed (the file is named in the message)."""


class StoragePermissionError(StorageError, PermissionError):
    """A file or folder exists but this process may not read or write it (EACCES/EPERM), e.g.
    mode 000 or another user's folder; names the path. Not evidence of damage."""


class StorageNotADirectoryError(StorageError, NotADirectoryError):
    """A regular file (or other non-folder) stands where the layout needs a folder: ``data/`` or
    a checkpoint folder replaced by a file, a reference whose base names a file (ENOTDIR)."""


class RootLeaseError(CheckpointError, RuntimeError):
    """The manager root is held by another ``CheckpointManager`` (two jobs pointed at one root),
    or this manager lost its hold; nothing was saved or deleted.

    Attributes:
        holder: the lease's record of its holder (``owner``, ``host``, ``pid``, ``expires``...),
            or None when unknown.
    """

    def __init__(self, message: str, *, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder


class DiskFullError(StorageError):
    """The storage ran out of space (ENOSPC/EDQUOT); nothing was committed."""

    def __init__(self, message: str):
        super().__init__(_errno.ENOSPC, message)


class MissingExtraError(CheckpointError, ImportError):
    """An integration (``shardckpt.integrations``) or CLI option needs an optional dependency
    that is not installed; the message names the ``pip install 'shardckpt[extra]'`` command."""


class ExportError(CheckpointError, ValueError):
    """An export (``shardckpt.ops.export``) cannot represent the checkpoint: two tensors map to the
    same output name, or a dtype the output format lacks; names the tensors at fault."""


class UnsupportedSaveError(CheckpointError, ValueError):
    """A save was asked for in a mode shardckpt cannot commit as one checkpoint (a DCP save with
    ``use_collectives=False`` on several ranks); nothing was written."""


class StateChangedError(CheckpointError, RuntimeError):
    """A guarded tensor changed in place before ``async_save`` had copied it; nothing was
    committed (the checkpoint would have been torn).

    Attributes:
        tensor: the tensor's key in the state (``/``-separated).
    """

    def __init__(self, message: str, *, tensor: str):
        super().__init__(message)
        self.tensor = tensor


class TransferError(CheckpointError, ConnectionError):
    """A peer died, hung past the timeout or sent nonsense while the local tier moved data
    files between nodes (the message names the peer rank); nothing was committed."""


class MetricNotFoundError(CheckpointError, KeyError):
    """A save rule checks a metric that ``maybe_save`` was not given (the message names it and
    the metrics that were given)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class NoResumableCheckpointError(CheckpointNotFoundError):
    """``restore`` found only weights-only (demoted) checkpoints: they hold no optimizer state
    to resume from (the message names them; ``load`` reads their weights)."""


class TrackerError(CheckpointError, RuntimeError):
    """An experiment tracker (MLflow, W&B) has no run to register checkpoints into, or cannot
    take what it was asked to (``copy=True`` of an object-store checkpoint)."""
