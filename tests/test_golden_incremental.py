"""The golden incremental pair (FORMAT.md revision 1.3) keeps loading, bit-exactly, with its
references into the base checkpoint; the v1 golden is covered by test_golden.py."""

import json
import os

import shardckpt
from tests.data.golden.make_golden_incremental import BASE, INCREMENTAL, ROOT, golden_pair
from tests.helpers import assert_same

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden", ROOT)


def test_golden_pair_loads_through_its_references():
    base, newer = golden_pair()
    for name, expected in ((BASE, base), (INCREMENTAL, newer)):
        loaded = shardckpt.load_full(os.path.join(GOLDEN, name))
        assert_same(expected, loaded)
        assert loaded["model"]["tied"] is loaded["model"]["fc.weight"]
        assert shardckpt.verify(os.path.join(GOLDEN, name)).ok


def test_golden_incremental_manifest_is_revision_1_3():
    with open(os.path.join(GOLDEN, INCREMENTAL, "manifest.json"), "rb") as f:
        doc = json.loads(f.read())
    assert doc["format_version"] == 1
    bases = {f.get("base") for f in doc["files"]}
    assert bases == {None, BASE}  # its own file (fc.bias) and the base's files
    assert doc["content_hashes"]["algorithm"] == "xxh3-128"
    own = [f for f in doc["files"] if "base" not in f]
    assert len(own) == 1 and own[0]["size"] < 200  # only the changed tensor was written
