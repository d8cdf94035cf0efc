"""Node topology as the launcher declares it: the one place that reads ``GROUP_RANK``,
``LOCAL_WORLD_SIZE``, ``RANK`` and SLURM's node count from the environment."""

from __future__ import annotations

import os

__all__ = ["node_index", "this_node", "nodes", "local_world_size"]


def node_index(rank: int, unknown: int | None = None) -> int:
    """Rank ``rank``'s node as the launcher says: ``GROUP_RANK`` (torchrun), else ``rank //
    LOCAL_WORLD_SIZE``; when neither is set, ``unknown`` (default: ``rank``, one node each)."""
    env = os.environ
    if env.get("GROUP_RANK", "") != "":
        return int(env["GROUP_RANK"])
    local = env.get("LOCAL_WORLD_SIZE", "")
    if local == "":
        return rank if unknown is None else unknown
    return rank // max(int(local), 1)


def this_node() -> int:
    """This process's node: ``GROUP_RANK`` (torchrun), else ``RANK // LOCAL_WORLD_SIZE``."""
    return node_index(int(os.environ.get("RANK", "0") or 0))


def nodes(world: int) -> int:
    """How many nodes the job spans, as the launcher says (torchrun's ``LOCAL_WORLD_SIZE``, else
    SLURM's node count); 1 when nobody says."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return -(-world // int(local))
    slurm = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or ""
    return int(slurm) if slurm.isdigit() and int(slurm) > 0 else 1


def local_world_size() -> int:
    """How many ranks share this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 when unset)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
