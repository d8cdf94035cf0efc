"""The first CLI commands: verify and inspect, with their exit codes."""

import json

import torch

import shardckpt
from shardckpt import cli
from shardckpt.testing import flip_byte


def test_verify_and_inspect(ckpt, capsys):
    shardckpt.save({"w": torch.arange(100.0)}, ckpt, metadata={"loss": 1.5})
    assert cli.main(["verify", str(ckpt)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.main(["inspect", str(ckpt), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tensors"]["w"] == {"dtype": "float32", "shape": [100], "shards": 1}
    assert doc["metadata"] == {"loss": 1.5}


def test_verify_fails_on_corruption(ckpt, capsys):
    shardckpt.save({"w": torch.arange(100.0)}, ckpt)
    flip_byte(ckpt / "data" / "rank-00000.bin", 20)
    assert cli.main(["verify", str(ckpt)]) == 1
    assert "CorruptCheckpointError" in capsys.readouterr().err
