"""Shard and chunk tables are checked for all tensors of a manifest at once; a batch must judge
each tensor exactly as that tensor checked alone would (nothing leaks between tensors)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shardckpt import codecs
from shardckpt.format import tables
from shardckpt.errors import CheckpointError, UnsafeCheckpointError
from shardckpt.types import DTYPES, TensorEntry

FILE_SIZES = np.array([1 << 20, 1 << 20], np.int64)
CHAINS = [(codecs.RAW, 1), (codecs.SHUFFLE_ZSTD, 4)]


def _entries() -> dict[str, TensorEntry]:
    """Tensors of ranks 0 to 3, empty ones, Shard(0) and column-split shards, both codecs."""
    f32, i64 = DTYPES["float32"], DTYPES["int64"]
    at = iter(range(16, 1 << 20, 4096))

    def raw(start, count, itemsize=4, file=0):
        return [file, next(at), count * itemsize, start, count, 0, 7]

    def zstd(start, count):
        return [1, next(at), 33, start, count, 1, 9]

    return {
        "scalar": TensorEntry.build(f32, (), [((), (), [raw(0, 1)])]),
        "rows": TensorEntry.build(f32, (10,), [((0,), (4,), [raw(0, 3), zstd(3, 1)]),
                                                ((4,), (6,), [raw(0, 6, file=1)])]),
        "cols": TensorEntry.build(i64, (4, 6), [((0, 0), (4, 3), [raw(0, 12, 8)]),
                                                ((0, 3), (4, 3), [raw(0, 5, 8), raw(5, 7, 8)])]),
        "empty": TensorEntry.build(f32, (0, 3), []),
        "cube": TensorEntry.build(f32, (2, 3, 4), [((0, 0, 0), (2, 3, 4),
                                                    [zstd(0, 8), zstd(8, 8), raw(16, 8)])]),
    }


def _items(entries):
    return [(key, tables.encode_entry(t), t.dtype, t.shape) for key, t in entries.items()]


def _verdict(items):
    """None if the tables pass, else the error's message."""
    try:
        tables.decode_entries(items, FILE_SIZES, CHAINS)
    except CheckpointError as exc:
        return str(exc)
    return None


def test_valid_tables_pass_together_and_alone():
    entries, items = _entries(), _items(_entries())
    for item, entry in zip(items, tables.decode_entries(items, FILE_SIZES, CHAINS)):
        assert np.array_equal(entry.chunks, entries[item[0]].chunks)
        assert np.array_equal(entry.boxes, entries[item[0]].boxes)
        assert _verdict([item]) is None


VALUES = [-1, 0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 33, 4096, 1 << 20, 1 << 31, 1 << 62, (1 << 63) - 1]


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(sorted(_entries())), field=st.sampled_from(["shards", "chunks"]),
       row=st.integers(0, 3), col=st.integers(0, 8), value=st.sampled_from(VALUES))
def test_a_batch_judges_each_tensor_as_it_would_alone(key, field, row, col, value):
    entries = _entries()
    t = entries[key]
    shards = np.concatenate([t.boxes, t.counts.reshape(-1, 1)], axis=1)
    table = shards if field == "shards" else t.chunks
    if not len(table):
        return
    table = table.copy()
    table[row % len(table), col % table.shape[1]] = value
    raw = tables.encode_entry(t)
    raw[field] = tables.encode(table)
    items = [(k, raw if k == key else tables.encode_entry(e), e.dtype, e.shape)
             for k, e in entries.items()]
    alone = _verdict([i for i in items if i[0] == key])
    # The same verdict and the same message, whatever tensors come before and after it.
    assert _verdict(items) == alone
    assert _verdict(items[::-1]) == alone


def test_chunk_counts_that_wrap_around_int64_are_refused():
    t = _entries()["rows"]
    shards = np.concatenate([t.boxes, t.counts.reshape(-1, 1)], axis=1)
    shards = np.concatenate([shards, shards])  # four shards claiming 2**62 chunks each
    shards[:, 2] = 1 << 62
    raw = {"shards": tables.encode(shards), "chunks": tables.encode(np.empty((0, 7), np.int64))}
    with pytest.raises(UnsafeCheckpointError):
        tables.decode_entries([("rows", raw, t.dtype, t.shape)], FILE_SIZES, CHAINS)


def test_the_error_names_the_faulty_tensor_among_many():
    entries = _entries()
    items = _items(entries)  # the faulty tensor goes between valid ones
    bad = tables.encode_entry(entries["cube"])
    chunks = entries["cube"].chunks.copy()
    chunks[1, 3] += 1  # a gap in the tiling
    bad["chunks"] = tables.encode(chunks)
    items.insert(2, ("faulty", bad, entries["cube"].dtype, entries["cube"].shape))
    with pytest.raises(UnsafeCheckpointError, match="tensor 'faulty': chunks do not tile"):
        tables.decode_entries(items, FILE_SIZES, CHAINS)
