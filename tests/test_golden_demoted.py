"""The golden demoted pair (FORMAT.md revision 1.5) keeps loading: the base holds only its
weights, bit-exactly, and the newer checkpoint still loads through its references into the
demoted base's files."""

import os

import shardckpt
from shardckpt.format.demote import is_weights
from shardckpt.format.manifest import parse
from tests.data.golden.make_golden_demoted import ROOT
from tests.data.golden.make_golden_incremental import BASE, INCREMENTAL, golden_pair
from tests.helpers import assert_same

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden", ROOT)


def test_golden_demoted_base_holds_only_its_weights():
    base, _ = golden_pair()
    assert set(base) - {"model"}, "the golden state must hold more than its weights"
    path = os.path.join(GOLDEN, BASE)
    loaded = shardckpt.load_full(path)
    assert_same({"model": base["model"]}, loaded)
    assert loaded["model"]["tied"] is loaded["model"]["fc.weight"]
    report = shardckpt.verify(path)
    assert report.ok
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        assert is_weights(parse(f.read()).metadata, "shardckpt.manager")


def test_golden_newer_checkpoint_loads_through_the_demoted_base():
    _, newer = golden_pair()
    path = os.path.join(GOLDEN, INCREMENTAL)
    assert_same(newer, shardckpt.load_full(path))
    assert shardckpt.verify(path).ok
