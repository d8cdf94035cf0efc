"""Helpers for testing shardckpt and code built on it (fault injection, corruption tools,
hosts made of network namespaces)."""

from .faults import Faults, flip_byte, truncate
from .hosts import Host, Hosts
from .ranks import RankResult, run_with_ranks

__all__ = ["Faults", "flip_byte", "truncate", "Host", "Hosts", "RankResult", "run_with_ranks"]
