"""Chunk index files (FORMAT.md 3.7, revision 1.4) are untrusted input like the manifest."""

import json
import os

import numpy as np
import pytest
import torch

import shardckpt
from shardckpt.format import chunk_index, grid, tables
from shardckpt import codecs
from shardckpt.errors import CorruptCheckpointError, UnsafeCheckpointError
from shardckpt.testing.hostile import read_doc, rewrite
from tests.helpers import assert_same

INDEX = "data/rank-00000.idx"


def _state():
    gen = torch.Generator().manual_seed(1)
    return {"w": torch.randn(40, 8, generator=gen), "b": torch.arange(7),
            "h": torch.randn(3, generator=gen).to(torch.bfloat16), "step": 5}


@pytest.fixture
def indexed(ckpt, monkeypatch):
    monkeypatch.setenv("SHARDCKPT_CHUNK_INDEX", "1")  # one process, index form forced
    shardckpt.save(_state(), ckpt, codec="zstd", chunk_bytes=256)
    return ckpt


def _load(path):
    out = {"w": torch.zeros(40, 8), "b": torch.zeros(7, dtype=torch.int64),
           "h": torch.zeros(3, dtype=torch.bfloat16), "step": 0}
    shardckpt.load(out, path)
    return out


def test_round_trip_through_an_index_file(indexed):
    doc = read_doc(indexed)
    assert [i["path"] for i in doc["indexes"]] == [INDEX]
    assert doc["codecs"] == [] and set(doc["tensors"]["w"]) == {"dtype", "shape", "boxes"}
    assert os.path.getsize(indexed / INDEX) == doc["indexes"][0]["size"]
    assert_same(_state(), _load(indexed))


def test_inline_form_stays_the_default_for_one_process(ckpt):
    shardckpt.save(_state(), ckpt)
    assert "indexes" not in read_doc(ckpt)
    assert not any(n.endswith(".idx") for n in os.listdir(ckpt / "data"))


def test_every_byte_flip_of_an_index_is_refused_naming_it(indexed):
    data = (indexed / INDEX).read_bytes()
    for i in range(0, len(data), max(1, len(data) // 97)):
        damaged = bytearray(data)
        damaged[i] ^= 0x04
        (indexed / INDEX).write_bytes(bytes(damaged))
        with pytest.raises(CorruptCheckpointError) as err:
            _load(indexed)
        assert err.value.file == INDEX
    (indexed / INDEX).write_bytes(data)
    _load(indexed)


def test_missing_or_truncated_index_is_refused_naming_it(indexed):
    data = (indexed / INDEX).read_bytes()
    (indexed / INDEX).write_bytes(data[:-3])
    with pytest.raises(CorruptCheckpointError, match="bytes") as err:
        _load(indexed)
    assert err.value.file == INDEX
    os.unlink(indexed / INDEX)
    with pytest.raises(CorruptCheckpointError, match="missing") as err:
        _load(indexed)
    assert err.value.file == INDEX


def _replace_index(path, edit):
    """Rewrite the index with ``edit(files, chains, rows)``'s result, re-signed and listed with
    its new size and checksum: a hostile writer's index, not a damaged one."""
    files, chains, rows = chunk_index.parse((path / INDEX).read_bytes(), _entry(path))
    data = chunk_index.to_bytes(0, *edit(files, chains, rows.copy()))
    (path / INDEX).write_bytes(data)

    def mutate(doc):
        doc["indexes"][0].update(size=len(data), crc32c=codecs.backend.crc32c(data))
    rewrite(path, mutate)


def _entry(path):
    from shardckpt.types import IndexEntry
    e = read_doc(path)["indexes"][0]
    return IndexEntry(e["path"], e["size"], e["rank"], e["crc32c"])


def _set(col, value):
    def edit(files, chains, rows):
        rows[0, col] = value
        return files, chains, rows
    return edit


@pytest.mark.parametrize("col,value", [(0, 99), (0, -1), (1, 1000), (2, 5), (7, 9)])
def test_hostile_rows_naming_what_does_not_exist_are_refused(indexed, col, value):
    _replace_index(indexed, _set(col, value))
    with pytest.raises(CorruptCheckpointError, match="does not exist") as err:
        _load(indexed)
    assert err.value.file == INDEX


@pytest.mark.parametrize("col,value", [(3, 1 << 40), (4, 1 << 40), (5, 3), (6, 0)])
def test_hostile_offsets_lengths_and_tiling_are_refused(indexed, col, value):
    _replace_index(indexed, _set(col, value))  # out of the file, overlapping, not tiling
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)):
        _load(indexed)


def test_an_index_naming_a_foreign_data_file_is_refused(indexed):
    _replace_index(indexed, lambda files, chains, rows: (["data/other.bin"], chains, rows))
    with pytest.raises(CorruptCheckpointError, match="does not list") as err:
        _load(indexed)
    assert err.value.file == INDEX


def test_an_index_with_an_unknown_codec_is_refused(indexed):
    _replace_index(indexed, lambda files, chains, rows: (files, [[{"id": "pickle"}]] * 3, rows))
    with pytest.raises(CorruptCheckpointError) as err:
        _load(indexed)
    assert err.value.file == INDEX


@pytest.mark.parametrize("path", ["data/../../x.idx", "data/rank-00000.bin", "manifest.json",
                                  "data/x.bin"])
def test_index_paths_outside_the_pattern_are_refused(indexed, path):
    rewrite(indexed, lambda doc: doc["indexes"][0].update(path=path))
    with pytest.raises(UnsafeCheckpointError):
        _load(indexed)


def test_an_index_that_is_a_link_out_of_the_checkpoint_is_refused(indexed, tmp_path):
    outside = tmp_path / "elsewhere.idx"
    outside.write_bytes((indexed / INDEX).read_bytes())
    os.unlink(indexed / INDEX)
    os.symlink(outside, indexed / INDEX)
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        _load(indexed)


def test_explicit_boxes_of_a_layout_must_cover_the_tensor(indexed):
    def shrink(doc):
        rows = tables.decode(doc["tensors"]["w"]["boxes"], 5, "w")
        rows[0, 2] -= 1
        doc["tensors"]["w"]["boxes"] = tables.encode(rows)
    rewrite(indexed, shrink)
    with pytest.raises(UnsafeCheckpointError, match="cover"):
        _load(indexed)


def test_a_grid_entry_is_checked():
    with pytest.raises(UnsafeCheckpointError):
        grid.check_splits([[0, 0, "chunk"]], (4,), "t")
    with pytest.raises(UnsafeCheckpointError):
        grid.check_splits([[1, 2, "chunk"], [0, 2, "chunk"]], (4, 4), "t")
    with pytest.raises(UnsafeCheckpointError):
        grid.check_splits([[0, 2, "pickle"]], (4,), "t")
    assert grid.check_splits([[0, 3, "even"]], (4,), "t") == ((0, 3, "even"),)


@pytest.mark.parametrize("n,parts", [(10, 3), (10, 4), (3, 8), (0, 2), (16, 4)])
@pytest.mark.parametrize("kind", grid.KINDS)
def test_grid_cells_tile_the_dimension_like_torch(n, parts, kind):
    box = grid.boxes((n, 2), ((0, parts, kind),))
    assert box[:, 2].sum() == n and (box[1:, 0] == box[:-1, 0] + box[:-1, 2]).all()
    if kind == "chunk":  # DTensor's Shard: torch.chunk sizes, then empty cells
        sizes = [len(c) for c in torch.arange(n).chunk(parts)] if n else []
        assert box[:len(sizes), 2].tolist() == sizes and not box[len(sizes):, 2].any()
    else:
        assert box[:, 2].max() - box[:, 2].min() <= 1


def test_rule_groups_and_explicit_fallback_in_the_merge():
    """Ranks agreeing on a rule give one grid entry; a key whose ranks do not (one rank sends
    an explicit box) falls back to boxes and still covers the tensor exactly once."""
    from shardckpt.save.merge import build_manifest, merge_plans, target_rows
    from shardckpt.format.manifest import check_complete
    from tests.save.test_merge_scale import rule_plans
    plans = rule_plans(8, explicit_rank=3)
    gp = merge_plans(plans, indexed=True)
    m = build_manifest(gp, plans, {r: {"files": []} for r in plans}, {})
    check_complete(m, "sim")
    assert m.tensors["g0"].splits == ((0, 8, "chunk"),)
    assert m.tensors["g1"].splits is None and len(m.tensors["g1"].boxes) == 8
    written = {}
    for r, answer in gp.answers.items():
        for item, tensor, shard in target_rows({"templates": gp.templates}, answer).tolist():
            assert (tensor, shard) not in written
            written[tensor, shard] = r
    cells = sum(len(grid.layout_boxes(t)) for t in m.tensors.values())
    assert len(written) == cells  # every shard written exactly once
    doc = json.loads(__import__("shardckpt.format.manifest", fromlist=["to_json"]).to_json(m)
                     .rsplit(b',"manifest_crc32c"', 1)[0] + b"}")
    assert doc["tensors"]["g0"] == {"dtype": "float32", "shape": [64, 4],
                                    "grid": [[0, 8, "chunk"]]}
    assert np.array_equal(grid.boxes((64, 4), m.tensors["g0"].splits)[:, 0],
                          np.arange(0, 64, 8))


def test_manifest_bytes_carry_the_index_files_in_one_checked_bundle(indexed):
    """What one rank fetches and broadcasts (share.py) holds the indexes too, so the other
    ranks read nothing more from storage to open the checkpoint."""
    from shardckpt.format import opening
    from shardckpt.storage import open_checkpoint
    storage, name = open_checkpoint(indexed)
    blob = opening.manifest_bytes(storage, name)
    assert blob.startswith(chunk_index.BUNDLE_MAGIC)
    os.unlink(indexed / INDEX)  # not read again: the bundle has it
    m = opening.checked_manifest(storage, name, blob)
    assert len(m.tensors["w"].chunks) > 1
    for bad in (blob[:-1], blob[:len(chunk_index.BUNDLE_MAGIC) + 4],
                chunk_index.BUNDLE_MAGIC + (1 << 60).to_bytes(8, "little")):
        with pytest.raises(CorruptCheckpointError):
            opening.checked_manifest(storage, name, bad)


def test_a_save_replaces_an_indexed_checkpoint_but_no_foreign_file(indexed, monkeypatch):
    monkeypatch.setenv("SHARDCKPT_CHUNK_INDEX", "0")
    with pytest.raises(shardckpt.CheckpointExistsError):
        shardckpt.save(_state(), indexed)
    shardckpt.save(_state(), indexed, overwrite=True)  # .idx files are a checkpoint's own
    assert "indexes" not in read_doc(indexed)
    assert_same(_state(), _load(indexed))
    (indexed / "data" / "notes.txt").write_text("mine")
    with pytest.raises(shardckpt.CheckpointExistsError, match="notes.txt"):
        shardckpt.save(_state(), indexed, overwrite=True)


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_VALUES = st.one_of(st.integers(-2**63, 2**63 - 1), st.none(), st.text(max_size=5),
                    st.lists(st.integers(-3, 3), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cells=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 8),
                                st.integers(-2**63, 2**63 - 1)), min_size=1, max_size=4),
       grid_value=_VALUES, field=st.sampled_from(["files", "codecs", "rank", "version", None]),
       value=_VALUES)
def test_fuzzed_indexes_and_layouts_raise_only_checkpoint_errors(indexed, cells, grid_value,
                                                                field, value):
    """Hostile but well-signed index rows, index fields and grid members: a load either
    succeeds or raises a CheckpointError, never anything else."""
    original = {p: (indexed / p).read_bytes() for p in (INDEX, "manifest.json")}
    try:
        def edit(files, chains, rows):
            for r, c, v in cells:
                rows[r % len(rows), c] = v
            return files, chains, rows
        _replace_index(indexed, edit)
        if field is not None:
            doc = json.loads((indexed / INDEX).read_bytes().rsplit(chunk_index.CRC_MEMBER, 1)[0]
                             + b"}")
            doc[field] = value
            body = json.dumps(doc, separators=(",", ":")).encode()[:-1]
            data = body + chunk_index.CRC_MEMBER + str(codecs.backend.crc32c(body)).encode() + b"}"
            (indexed / INDEX).write_bytes(data)
            rewrite(indexed, lambda d: d["indexes"][0].update(
                size=len(data), crc32c=codecs.backend.crc32c(data)))
        rewrite(indexed, lambda d: d["tensors"].update(g={"dtype": "float32", "shape": [4],
                                                          "grid": grid_value}))
        try:
            shardckpt.load_full(indexed)
        except shardckpt.CheckpointError:
            pass
    finally:
        for p, data in original.items():
            (indexed / p).write_bytes(data)
