"""The typed encoding of values the state tree cannot hold (hyperparameters of Lightning
checkpoints): round trips through a real checkpoint, never imports or calls what a checkpoint
names beyond the documented containers, and keeps what it cannot type readable."""

import argparse
import enum
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import shardckpt
from shardckpt.integrations.portable import TAG, PortableValueWarning, decode, encode


class Color(enum.Enum):
    RED = 1


def _round_trip(value, tmp_path):
    shardckpt.save({"v": encode(value)}, tmp_path / "c")
    return decode(shardckpt.load_full(tmp_path / "c"))["v"]


def test_typed_values_round_trip_through_a_checkpoint(tmp_path):
    value = {"path": pathlib.PurePosixPath("/a/b"), "color": Color.RED, "ns":
             argparse.Namespace(lr=0.1), "s": frozenset({1, 2}), "np": np.int16(7),
             "arr": np.arange(3.0), "keys": {Color.RED: 1, (1, 2): "t"}, "cls": dict,
             "w": torch.ones(2), "nested": [(1, pathlib.Path("x"))]}
    back = _round_trip(value, tmp_path)
    assert back["path"] == value["path"] and type(back["path"]) is pathlib.PurePosixPath
    assert back["color"] is Color.RED and back["ns"] == value["ns"]
    assert back["s"] == frozenset({1, 2}) and type(back["s"]) is frozenset
    assert back["np"] == 7 and back["np"].dtype == np.int16
    assert np.array_equal(back["arr"], value["arr"]) and back["keys"] == value["keys"]
    assert back["cls"] is dict and torch.equal(back["w"], value["w"])
    assert back["nested"] == [(1, pathlib.Path("x"))]


def test_a_checkpoint_cannot_make_the_decoder_import_or_call_code():
    # A class outside the allowlist stays its name: Lightning would call hparams_type(dict).
    assert decode({TAG: "class", "name": "subprocess.Popen"}) == "subprocess.Popen"
    assert subprocess.Popen  # imported here, and still refused
    # An Enum of a module nobody imported is not imported: its value comes back, with a warning.
    with pytest.warns(PortableValueWarning, match="not imported"):
        assert decode({TAG: "enum", "class": "antigravity.Fly", "name": "UP",
                       "value": 1}) == 1
    assert "antigravity" not in sys.modules
    # An unknown kind is left as the dict it is.
    assert decode({TAG: "pickle", "data": "..."}) == {TAG: "pickle", "data": "..."}


def test_untyped_values_are_readable_and_user_tag_keys_survive(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = _round_trip({"fn": len, TAG: "mine"}, tmp_path)
    assert back == {"fn": "<built-in function len>", TAG: "mine"}
    assert [str(w.message) for w in caught if w.category is PortableValueWarning][0] \
        .startswith("fn: a builtin_function_or_method")
