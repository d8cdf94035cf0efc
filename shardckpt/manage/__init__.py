"""Managing checkpoints on top of the save/load pipeline: ``CheckpointManager`` (manager), which
checkpoints to keep (retention), SIGTERM preemption (preemption), the names under a manager root
and their garbage collection (layout), and the node-local tier with replicas on other nodes
(``tier/``), the restore verdict shared by both (verdict) and the options (config); the
policies: save rules (policy), keep rules (keep), the ``Auto`` cost model (interval), their use
per call and after each commit (schedule, pruning) and the root's history (history). Nothing here
reaches inside a stage: these modules use the pipelines through ``shardckpt.save`` and
``shardckpt.load``."""

from .config import ManagerConfig
from .manager import EXIT_GRACE_EXPIRED, EXIT_PREEMPTED, CheckpointManager

__all__ = ["CheckpointManager", "ManagerConfig", "EXIT_PREEMPTED", "EXIT_GRACE_EXPIRED"]
