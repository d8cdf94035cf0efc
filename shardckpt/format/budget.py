"""The memory budget of a checkpoint's metadata (FORMAT.md 5): one total over the manifest and
all its index files, checked before any table is decoded or any grid cell is built.

Opening a checkpoint turns its tables (3.3), grid rules and index rows (3.7) into int64 arrays.
Each is capped on its own, but a cap per table or per tensor is no bound: a 1.4 KB manifest of
empty tensors whose grids claim 2^24 cells each, or a 1 MB index whose rows declare 8 GiB, would
make a reader allocate gigabytes. So every decoded row is counted first, from what the metadata
declares (a zstd frame's content size, a grid's cell count), and the sum must stay within
``RATIO`` bytes per byte on disk, plus ``FLOOR``.

Why an honest checkpoint passes: every chunk row needs at least one stored byte of a data file
(chunks do not overlap) and its own row in a table on disk, and every shard that holds elements
needs a chunk; with chunks of the default megabytes the claim is a tiny fraction of a byte per
byte on disk, and even 8-byte chunks stay well inside (tests/faults/test_memory_bounds.py loads
them, and the golden checkpoints, with no ``FLOOR`` at all). Only rows that need no bytes (empty
grid cells) come for free, and ``FLOOR`` leaves room for those. What the decoding then takes at
its peak is about 4x the claim (measured: 3.2x to 3.6x).

The data files' sizes come from the manifest; they are checked on disk (``data_bytes``) only
when the manifest and index bytes alone do not cover the claim, so the common case costs no
stat per file.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import MetadataBudgetError

RATIO = 64  # decoded metadata bytes per byte on disk
FLOOR = 64 << 20  # decoded metadata bytes any checkpoint may have, even one without data
CELL = 8  # bytes of one int64 cell


def shard_claim(shards: int, ndim: int) -> int:
    """Bytes ``shards`` boxes take once decoded, padded to ``ndim`` dimensions (tables.py
    checks the shards of all tensors at once, padded to the largest rank): offsets, sizes and a
    count or writer per shard."""
    return shards * (2 * ndim + 1) * CELL


def chunk_claim(rows: int) -> int:
    """Bytes ``rows`` chunk rows take once decoded (index rows: tensor, shard, 7 columns)."""
    return rows * 9 * CELL


def grid_cells(splits) -> int:
    """The number of cells (shards) grid rule ``splits`` (``(dim, parts, kind)``) declares."""
    return math.prod(parts for _, parts, _ in splits)


def check(claim: int, metadata: int, files, data_bytes: Callable | None, where: str) -> None:
    """Refuse ``claim`` decoded bytes unless the bytes on disk cover it: ``metadata`` (the
    manifest and index bytes read) plus, when that is not enough, the data ``files``' sizes as
    ``data_bytes(files)`` reports them (checked on disk; None trusts the recorded sizes, for a
    writer checking its own manifest).

    Raises:
        MetadataBudgetError: naming ``where``, before anything was allocated.
    """
    if claim <= FLOOR + RATIO * metadata:
        return
    data = sum(f.size for f in files) if data_bytes is None else data_bytes(files)
    if claim <= FLOOR + RATIO * (metadata + data):
        return
    raise MetadataBudgetError(
        f"{where}: its tables and grids declare {claim} decoded bytes, more than the budget of "
        f"{RATIO} per byte on disk plus {FLOOR} ({metadata} bytes of manifest and index files, "
        f"{data} bytes of data files): refused before decoding any of it")
