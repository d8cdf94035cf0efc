"""References between checkpoints of one root (FORMAT.md 3.6): the manifest's side.

An incremental checkpoint stores only the chunks whose content changed; for the others its
manifest names the data file of an earlier checkpoint under the same root (a file entry with a
``base``) and the chunk's place in it. This module checks those names as untrusted input and
reads and writes the ``content_hashes`` table that lets the next save find unchanged chunks.
Saving is in ``incremental.py``, retention and copies in ``retire.py``.
"""

from __future__ import annotations

import re

import numpy as np

from . import tables
from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from ..types import MANIFEST_NAME, Manifest

HASH_ALGORITHM = "xxh3-128"
# A sibling checkpoint's folder name: one path segment, never hidden, never "." or "..".
BASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_base_name(value, where: str) -> str | None:
    """``value`` when it names a sibling checkpoint (None: no base); UnsafeCheckpointError for
    anything that could lead elsewhere (a path, ``..``, a hidden name)."""
    if value is None:
        return None
    if not isinstance(value, str) or not BASE_NAME.fullmatch(value) or ".." in value:
        raise UnsafeCheckpointError(f"{MANIFEST_NAME}: {where} {value!r:.120} is not the name "
                                    "of a checkpoint under the same root")
    return value


def hashes_json(hashes: np.ndarray) -> dict:
    """The ``content_hashes`` member for (C, 2) int64 rows (lo, hi words of each hash)."""
    return {"algorithm": HASH_ALGORITHM, "table": tables.encode(hashes)}


def parse_hashes(raw, tensors: dict) -> np.ndarray | None:
    """The (C, 2) hash rows of a parsed manifest's ``content_hashes`` member (None if absent);
    one row per chunk row, tensors in manifest order."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"algorithm", "table"} \
            or raw["algorithm"] != HASH_ALGORITHM:
        raise CorruptCheckpointError(f"content_hashes must be {{algorithm: {HASH_ALGORITHM!r}, "
                                     "table}", file=MANIFEST_NAME)
    rows = tables.decode(raw["table"], 2, "content_hashes")
    total = sum(len(t.chunks) for t in tensors.values())
    if len(rows) != total:
        raise CorruptCheckpointError(f"content_hashes has {len(rows)} rows for {total} chunks",
                                     file=MANIFEST_NAME)
    return rows


def referenced_files(m: Manifest) -> set[tuple[str, str]]:
    """``(checkpoint, path)`` of every file in another checkpoint that ``m`` references."""
    return {(f.base, f.path) for f in m.files if f.base is not None}


def stored_split(m: Manifest) -> tuple[int, int]:
    """``(written, referenced)``: stored bytes of the chunks this checkpoint wrote itself and of
    those it references in earlier checkpoints."""
    if not m.files:
        return 0, 0
    is_ref = np.array([f.base is not None for f in m.files], bool)
    written = referenced = 0
    for t in m.tensors.values():
        if len(t.chunks):
            ref = is_ref[t.chunks[:, 0]]
            referenced += int(t.chunks[ref, 2].sum())
            written += int(t.chunks[~ref, 2].sum())
    return written, referenced
