"""Save's pipeline: plan -> merge (coordinator) -> stage -> write or upload -> commit, run by
``pipeline`` in rounds among the ranks, plus ``asyncsave``, ``guard`` and ``incremental``; the
names here are what manage/, cli/, integrations/ and ops/ may use."""

from .asyncsave import SaveHandle, SaveInProgressError, async_save, split_budget
from .commit import MarkerCommit, RenameCommit, commit_for, refuse_to_clobber
from .incremental import managed_base, written_split
from .merge import build_manifest
from .pipeline import PlannedSave, check_metadata, plan_save, run_save, write_rank
from .plan import plan_chunks
from .stage import Stager, StagingArena, Worker, default_budget
from .upload import upload as upload_parts, write_targets
from .write import CodecTable, WriteOptions, write_data_files

__all__ = [
    "SaveHandle", "SaveInProgressError", "async_save", "split_budget",
    "MarkerCommit", "RenameCommit", "commit_for", "refuse_to_clobber",
    "managed_base", "written_split", "build_manifest",
    "PlannedSave", "check_metadata", "plan_save", "run_save", "write_rank", "plan_chunks",
    "Stager", "StagingArena", "Worker", "default_budget", "upload_parts", "write_targets",
    "CodecTable", "WriteOptions", "write_data_files",
]
