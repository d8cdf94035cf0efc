"""Coordination among ranks: store-based rounds (``rounds``), gloo groups (``groups``), node
topology from the launcher (``topology``), the node's /dev/shm folder (``nodeshm``) and file
transfer between ranks (``transfer``)."""

from .rounds import Exchange, PerRank, exchange, local_only
from .topology import node_index, nodes

__all__ = ["Exchange", "PerRank", "exchange", "local_only", "node_index", "nodes"]
