"""One restore attempt and its verdict, shared by the manager's restore and the local tier's:
load a checkpoint, then classify the outcome by one list of fatal errors so that the ranks can
agree (the maximum over the ranks wins)."""

from __future__ import annotations

import errno

from ..api import load
from ..errors import (CheckpointError, StateMismatchError, StorageError,
                      StorageNotADirectoryError, UnsupportedValueError)

__all__ = ["OK", "SKIP", "FATAL", "FATAL_ERRORS", "is_fatal", "try_load", "agreed_error"]

OK, SKIP, FATAL = 0, 1, 2  # ordered: the ranks' verdict is the maximum of theirs
# Errors that say more about the target or the storage than about one checkpoint (the state does
# not fit, an outage). Restore still tries older checkpoints, but when none loads it raises the
# newest such error instead of returning None: starting afresh would be wrong, and the next
# save's retention would delete the checkpoints that could not be read.
FATAL_ERRORS = (StateMismatchError, UnsupportedValueError, StorageError)


def is_fatal(error: BaseException | None, local_copy: bool = False) -> bool:
    """Whether ``error`` is one of ``FATAL_ERRORS``. A file where a folder belongs or a link loop
    is damage to that one checkpoint; so is any StorageError on a node's local copy
    (``local_copy``): the durable tier is still there to restore from."""
    if not isinstance(error, FATAL_ERRORS) or isinstance(error, StorageNotADirectoryError):
        return False
    if getattr(error, "errno", None) == errno.ELOOP:
        return False
    return not (local_copy and isinstance(error, StorageError))


def try_load(state, path, options: dict, local_copy: bool = False) -> tuple[int, Exception | None]:
    """Load ``path`` into ``state``: ``(verdict, error)``, OK with None when it loaded."""
    try:
        load(state, path, **options)
    except CheckpointError as exc:
        return (FATAL if is_fatal(exc, local_copy) else SKIP), exc
    return OK, None


def agreed_error(error: Exception | None, path, local_copy: bool = False) -> CheckpointError:
    """The error to raise for an agreed FATAL verdict: this rank's own when it is fatal, else
    one saying another rank's was."""
    if is_fatal(error, local_copy):
        return error
    return CheckpointError(f"{path}: restore failed on another rank")
