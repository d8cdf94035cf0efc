"""Managing checkpoints on top of the save/load pipeline: ``CheckpointManager`` (manager), which
checkpoints to keep (retention), SIGTERM preemption (preemption), the names under a manager root
and their garbage collection (layout), and the node-local tier with replicas on other nodes
(tiers, tier_transfer, tier_restore, tier_promote). Nothing here reaches inside a stage: these
modules call ``save`` / ``async_save`` / ``load`` and the storage and commit interfaces."""
