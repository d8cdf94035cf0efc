"""shardckpt: sharded, atomic, resumable checkpoints for PyTorch training.

The public surface is small: ``save``, ``async_save``, ``load``, ``load_full``, ``verify``,
``CheckpointManager`` (periodic saves, retention, preemption, resume) and the errors.
``shardckpt.codecs.BACKEND`` says whether the native core or the reference codec is in use.
"""

from ._version import __version__
from .api import SaveInfo, VerifyReport, load, load_full, save, verify
from .save.asyncsave import SaveHandle, SaveInProgressError, async_save
from .manage.manager import EXIT_GRACE_EXPIRED, EXIT_PREEMPTED, CheckpointManager
from .errors import (CheckpointError, CheckpointExistsError, CheckpointNotFoundError,
                     CorruptCheckpointError, DiskFullError, ExportError, IncompleteCheckpointError,
                     MissingExtraError, RankFailureError, StateChangedError, StateMismatchError,
                     StorageError, UnsafeCheckpointError, UnsupportedValueError)

__all__ = [
    "__version__", "save", "async_save", "load", "load_full", "verify", "SaveInfo",
    "SaveHandle", "SaveInProgressError", "VerifyReport",
    "CheckpointManager", "EXIT_PREEMPTED", "EXIT_GRACE_EXPIRED",
    "CheckpointError", "CheckpointExistsError", "CheckpointNotFoundError",
    "CorruptCheckpointError", "DiskFullError", "IncompleteCheckpointError", "RankFailureError",
    "StateMismatchError", "StorageError", "UnsafeCheckpointError", "UnsupportedValueError",
    "StateChangedError", "ExportError", "MissingExtraError",
]

from .errors import UnsupportedSaveError  # noqa: E402  (DCP rank-local saves)
__all__ += ["UnsupportedSaveError"]
from .errors import TransferError  # noqa: E402  (the local tier's transfers)
__all__ += ["TransferError"]

from .errors import (RootLeaseError, StorageNotADirectoryError,  # noqa: E402  (issue 25)
                     StoragePermissionError)
__all__ += ["RootLeaseError", "StoragePermissionError", "StorageNotADirectoryError"]
