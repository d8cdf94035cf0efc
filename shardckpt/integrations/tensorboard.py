"""``TensorBoardEvents``: a ready ``on_event`` callback that logs each save to TensorBoard.

    from shardckpt.integrations.tensorboard import TensorBoardEvents
    tb = TensorBoardEvents("runs/exp1")            # or TensorBoardEvents(writer=my_writer)
    mgr = shardckpt.CheckpointManager("ckpt", every_n_steps=500, on_event=tb)

Scalars, at the checkpoint's step: ``shardckpt/save_stall_seconds`` (how long the training was
blocked), ``shardckpt/save_seconds`` (until the commit), ``shardckpt/stored_bytes`` and
``shardckpt/compression_ratio`` (raw / stored), all of this rank's own. Needs
``pip install 'shardckpt[tensorboard]'``.
"""

from __future__ import annotations

from . import require
from ..observe import SAVE_COMMITTED, SAVE_STARTED, CheckpointEvent

PREFIX = "shardckpt/"


class TensorBoardEvents:
    """Write checkpoint events as SummaryWriter scalars.

    Args:
        log_dir: where a new ``torch.utils.tensorboard.SummaryWriter`` writes (ignored when
            ``writer`` is given).
        writer: an existing SummaryWriter (shared with the training's own scalars).
        rank0_only: write on rank 0 only (default), so that N ranks make one event file.
    """

    def __init__(self, log_dir: str | None = None, *, writer=None, rank0_only: bool = True):
        if writer is None:
            require("tensorboard", "tensorboard", "TensorBoardEvents")
            tb = require("torch.utils.tensorboard", "tensorboard", "TensorBoardEvents")
            writer = tb.SummaryWriter(log_dir=log_dir)
        self.writer = writer
        self.rank0_only = rank0_only

    def _active(self) -> bool:
        if not self.rank0_only:
            return True
        import torch.distributed as dist
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def __call__(self, event: CheckpointEvent) -> None:
        """Log ``event``'s scalars (save started: the stall; save committed: the rest)."""
        if event.step is None or not self._active():
            return
        add = self.writer.add_scalar
        if event.kind == SAVE_STARTED and event.stall_seconds is not None:
            add(PREFIX + "save_stall_seconds", event.stall_seconds, event.step)
        elif event.kind == SAVE_COMMITTED:
            add(PREFIX + "save_seconds", event.seconds, event.step)
            add(PREFIX + "stored_bytes", event.stored_bytes, event.step)
            if event.ratio is not None:
                add(PREFIX + "compression_ratio", event.ratio, event.step)
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the writer."""
        self.writer.close()
