"""Codec chains (FORMAT.md 2.1) and the backend that runs them.

A chunk's chain is one of four shapes; the native core and the reference codec both name them by
a small integer *kind*. This module maps kinds to the manifest's chain objects and back, and picks
the backend: the native core (``shardckpt._native``) or, when that is missing, the pure-Python
reference codec with a warning. ``BACKEND`` says which one is loaded.
"""

from __future__ import annotations

import warnings

from ..errors import UnsafeCheckpointError

from .ids import RAW, SHUFFLE, SHUFFLE_ZSTD, ZSTD

POLICIES = ("raw", "zstd", "auto")


def chain_for(kind: int, shuffle_size: int, level: int) -> tuple[dict, ...]:
    """The manifest chain for a chunk encoded as ``kind``."""
    shuffle = {"id": "shuffle", "elementsize": shuffle_size}
    zstd = {"id": "zstd", "level": level}
    return {RAW: (), SHUFFLE: (shuffle,), ZSTD: (zstd,), SHUFFLE_ZSTD: (shuffle, zstd)}[kind]


def kind_of(chain) -> tuple[int, int]:
    """``(kind, shuffle_size)`` of a manifest chain; refuses anything FORMAT.md does not allow."""
    if not isinstance(chain, (list, tuple)) or not all(isinstance(c, dict) for c in chain):
        raise UnsafeCheckpointError(f"codec chain is not a list of objects: {chain!r}")
    ids = [c.get("id") for c in chain]
    if not all(isinstance(i, str) for i in ids):  # a list or object id is unhashable below
        raise UnsafeCheckpointError(f"codec ids must be strings: {chain!r:.120}")
    shuffle_size = 1
    if ids and ids[0] == "shuffle":
        k = chain[0].get("elementsize")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise UnsafeCheckpointError(f"bad shuffle elementsize in codec chain {chain!r}")
        shuffle_size = k
    kinds = {(): RAW, ("shuffle",): SHUFFLE, ("zstd",): ZSTD, ("shuffle", "zstd"): SHUFFLE_ZSTD}
    kind = kinds.get(tuple(ids))
    if kind is None:
        raise UnsafeCheckpointError(f"unknown codec chain {ids!r} (format v1 allows "
                                    "[], [shuffle], [zstd], [shuffle, zstd])")
    return kind, shuffle_size


def _load_backend():
    try:
        from .. import _native
        return _native, "native"
    except ImportError as exc:  # a source checkout without a build, or a foreign platform
        warnings.warn(f"shardckpt native core unavailable ({exc}); using the slow pure-Python "
                      "reference codec", RuntimeWarning, stacklevel=3)
        from . import reference
        return reference, "reference"


backend, BACKEND = _load_backend()
