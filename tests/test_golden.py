"""Checkpoints written by earlier format versions keep loading, bit-exactly."""

import os

import pytest
import torch

import shardckpt
from tests.data.golden.make_golden import golden_state, golden_state_1_2
from tests.helpers import assert_same

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")


@pytest.mark.parametrize("version", ["v1"])
def test_golden_checkpoint_loads(version):
    path = os.path.join(GOLDEN, version)
    loaded = shardckpt.load_full(path)
    expected = golden_state()
    expected["model"]["tied"] = expected["model"]["fc.weight"]
    assert_same(expected, loaded)
    assert loaded["model"]["tied"] is loaded["model"]["fc.weight"]
    shardckpt.verify(path)


def test_golden_loads_in_place_into_fresh_state():
    state = golden_state()
    for t in state["model"].values():
        t.zero_()
    state["model"]["tied"] = state["model"]["fc.weight"]
    state["step"] = 0
    shardckpt.load(state, os.path.join(GOLDEN, "v1"))
    assert state["step"] == 1200
    assert_same(golden_state()["model"]["embed.weight"], state["model"]["embed.weight"])


def test_golden_revision_1_2_loads_bytes_and_sizes():
    """Revision 1.2 (FORMAT.md 3.4): bytes, io.BytesIO and torch.Size values."""
    path = os.path.join(GOLDEN, "v1.2")
    loaded = shardckpt.load_full(path)
    expected = golden_state_1_2()
    want, got = expected.pop("values_1_2"), loaded.pop("values_1_2")
    assert got["buffer"].getvalue() == want.pop("buffer").getvalue()
    got.pop("buffer")
    assert got == want and type(got["size"]) is torch.Size
    expected["model"]["tied"] = expected["model"]["fc.weight"]
    assert_same(expected, loaded)
    shardckpt.verify(path)


def test_a_reader_meeting_an_unknown_node_kind_refuses_it(tmp_path):
    """How a reader reacts to a node kind from a later revision (what a 1.0/1.1 reader does
    with ``bytes``): a typed error naming the kind, not a crash or a guess."""
    import json
    from shardckpt.format import manifest as manifest_mod
    src = os.path.join(GOLDEN, "v1.2")
    m = manifest_mod.parse(open(os.path.join(src, "manifest.json"), "rb").read())
    text = json.dumps(m.tree).replace('"bytesio"', '"from_the_future"')
    with pytest.raises(shardckpt.UnsafeCheckpointError, match="from_the_future"):
        from shardckpt.format.tree import build
        build(json.loads(text), lambda k: None, blob=lambda k: b"")


def test_golden_revision_1_4_index_files_and_grid_rules_load():
    """Revision 1.4 (FORMAT.md 3.7), saved by 2 ranks: grid rules, explicit boxes, chunk
    index files; consolidates on one process, and each saving rank's values come back."""
    import json
    from tests.data.golden.make_golden_index import NAME, full_state
    path = os.path.join(GOLDEN, NAME)
    doc = json.load(open(os.path.join(path, "manifest.json")))
    assert len(doc["indexes"]) == 2 and doc["tensors"]["model/w"]["grid"] == [[0, 2, "chunk"]]
    assert "boxes" in doc["tensors"]["model/odd"]
    expected = full_state()
    assert_same(expected, shardckpt.load_full(path))
    expected["position"] = 101
    assert_same(expected, shardckpt.load_full(path, rank=1))
    shardckpt.verify(path)
