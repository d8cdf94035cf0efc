"""Checkpoints written by earlier format versions keep loading, bit-exactly."""

import os

import pytest

import shardckpt
from tests.data.golden.make_golden import golden_state
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
