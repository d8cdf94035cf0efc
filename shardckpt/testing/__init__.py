"""Helpers for testing shardckpt and code built on it (fault injection, corruption tools)."""

from .faults import Faults, flip_byte, truncate

__all__ = ["Faults", "flip_byte", "truncate"]
