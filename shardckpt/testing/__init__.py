"""Helpers for testing shardckpt and code built on it (fault injection, corruption tools)."""

from .faults import Faults, flip_byte, truncate
from .ranks import RankResult, run_with_ranks

__all__ = ["Faults", "flip_byte", "truncate", "RankResult", "run_with_ranks"]
