"""The manifest is untrusted input: every damaged or hostile manifest gets a typed error."""

import base64
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import shardckpt
from shardckpt.format import manifest, tables
from shardckpt.testing.hostile import edit_table, resign, rewrite, set_cell
from shardckpt.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError


@pytest.fixture
def saved(ckpt):
    gen = torch.Generator().manual_seed(0)
    shardckpt.save({"w": torch.randn(64, 8, generator=gen), "b": torch.arange(5),
                    "opt": {"step": 3, "betas": (0.9, 0.99)}}, ckpt, codec="zstd",
                   chunk_bytes=512)
    return ckpt


def drop_last_chunk(doc):
    edit_table(doc, "w", "chunks", lambda rows: rows[:-1])
    edit_table(doc, "w", "shards", lambda rows: rows - np.array([0, 0, 0, 0, 1]))


def test_every_single_byte_corruption_of_the_manifest_is_detected(saved):
    data = open(saved / "manifest.json", "rb").read()
    manifest.parse(data)
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x01
        with pytest.raises(CorruptCheckpointError):
            manifest.parse(bytes(damaged))


@pytest.mark.parametrize("bad_path", ["../outside.bin", "/etc/passwd", "data/../../x",
                                      "data/sub/x.bin", "data/.hidden", "manifest.json", ""])
def test_file_paths_outside_data_are_refused(saved, bad_path):
    rewrite(saved, lambda d: d["files"][0].update(path=bad_path))
    with pytest.raises(UnsafeCheckpointError):
        shardckpt.load_full(saved)


def test_symlink_out_of_the_checkpoint_is_refused(saved, tmp_path):
    real = saved / "data" / "rank-00000.bin"
    outside = tmp_path / "outside.bin"
    os.rename(real, outside)
    os.symlink(outside, real)
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        shardckpt.load_full(saved)


@pytest.mark.parametrize("mutate, error", [
    (lambda d: d.update(format_version=2), UnsafeCheckpointError),
    (lambda d: d["codecs"].append([{"id": "pickle"}]), UnsafeCheckpointError),
    (lambda d: d["files"][0].update(size=-1), UnsafeCheckpointError),
    (lambda d: d["files"][0].update(base="../step-1"), UnsafeCheckpointError),
    (lambda d: d["tensors"]["w"].update(shape=[1 << 40, 1 << 40]), UnsafeCheckpointError),
    (lambda d: edit_table(d, "w", "chunks", set_cell(0, 2, 1 << 40)), UnsafeCheckpointError),
    (lambda d: edit_table(d, "w", "chunks", set_cell(0, 1, 3)), UnsafeCheckpointError),
    (lambda d: edit_table(d, "w", "chunks", set_cell(1, 3, 0)), UnsafeCheckpointError),
    (lambda d: edit_table(d, "w", "chunks", set_cell(0, 0, 5)), UnsafeCheckpointError),
    (lambda d: edit_table(d, "w", "chunks", set_cell(0, 5, -1)), UnsafeCheckpointError),
    (lambda d: edit_table(d, "w", "shards", set_cell(0, 0, 1)), UnsafeCheckpointError),
    (lambda d: edit_table(d, "w", "shards", set_cell(0, 2, 65)), UnsafeCheckpointError),
    (drop_last_chunk, UnsafeCheckpointError),
    (lambda d: d["tensors"]["w"].update(chunks="not base64!"), CorruptCheckpointError),
    (lambda d: d["tensors"]["w"].update(chunks="AAAA"), CorruptCheckpointError),
    (lambda d: d["tensors"]["w"].update(chunks=base64.b64encode(  # declares 16 GiB
        bytes.fromhex("28b52ffde00000000004000000")).decode()), CorruptCheckpointError),
    (lambda d: d["tensors"]["w"].update(dtype="object"), UnsafeCheckpointError),
    # an unknown node kind (this one asks to unpickle) is refused as unsafe, like an unknown
    # codec (FORMAT.md 3.4.1)
    (lambda d: d.update(tree={"pickle": "cos\nsystem\n"}), UnsafeCheckpointError),
    (lambda d: d.update(tree={"tensor": "nope"}), CorruptCheckpointError),
    (lambda d: d.update(tree={"dict": [["a", {"tensor": None}], ["b", {"tensor": 0}]]}),
     CorruptCheckpointError),  # found by the fuzz test below
    (lambda d: d["codecs"].append([{"id": {"zstd": 1}}]),  # found by scripts/soak_faults.py
     UnsafeCheckpointError),
    (lambda d: d.update(tree={"float": "0x1p+99999"}), CorruptCheckpointError),  # ditto
])
def test_hostile_manifests_are_refused(saved, mutate, error):
    rewrite(saved, mutate)
    with pytest.raises(error):
        shardckpt.load_full(saved)


def _mutations():
    scalar = st.one_of(st.integers(-2**64, 2**64), st.text(max_size=8), st.none(),
                       st.booleans(), st.floats(allow_nan=False, allow_infinity=False))
    return st.lists(st.tuples(st.integers(0, 10**6), scalar), min_size=1, max_size=4)


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))
    else:
        yield path


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_mutations())
def test_fuzzed_manifests_raise_only_checkpoint_errors(saved, mutations):
    original = (saved / "manifest.json").read_bytes()
    doc = json.loads(original)
    leaves = list(_leaves(doc))
    for pick, value in mutations:
        path = leaves[pick % len(leaves)]
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    try:
        parsed = manifest.parse(resign(doc))
    except CheckpointError:
        return
    # Whatever parses must be safe to read: loading either succeeds or raises our errors.
    (saved / "manifest.json").write_bytes(resign(doc))
    try:
        shardckpt.load_full(saved)
    except CheckpointError:
        pass
    finally:
        (saved / "manifest.json").write_bytes(original)
    assert parsed is not None
