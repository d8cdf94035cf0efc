"""verify and inspect, their exit codes, and the behaviour every subcommand shares."""

import os
import subprocess
import sys

import pytest
import torch

import shardckpt
from shardckpt.testing import flip_byte, truncate

from .conftest import save_step


def test_inspect_lists_entries_values_and_metadata(ckpt, run, model_state):
    shardckpt.save(model_state, ckpt, metadata={"note": "x"}, codec="zstd")
    doc = run.json("inspect", ckpt)
    w = doc["tensors"]["model/w"]
    assert (w["dtype"], w["shape"], w["shards"]) == ("float32", [32, 16], 1)
    assert w["raw_bytes"] == 32 * 16 * 4 and 0 < w["stored_bytes"] <= w["raw_bytes"]
    assert w["codecs"] and all("zstd" in c for c in w["codecs"])
    assert doc["tensors"]["model/b"]["dtype"] == "bfloat16"
    assert doc["values"] == {"step": 7, "lr": 0.25, "name": "run-a"}
    assert doc["metadata"] == {"note": "x"} and doc["world_size"] == 1
    assert doc["raw_bytes"] == sum(t["raw_bytes"] for t in doc["tensors"].values())
    status, out, _ = run("inspect", ckpt)
    assert status == 0 and "model/w" in out and "bfloat16" in out and "'run-a'" in out


def test_verify_sound(ckpt, run):
    shardckpt.save({"w": torch.arange(100.0)}, ckpt)
    status, out, _ = run("verify", ckpt)
    assert status == 0 and out.startswith("OK")
    doc = run.json("verify", ckpt)
    assert doc["ok"] and doc["problems"] == [] and doc["tensors"] == 1


def test_verify_names_every_bad_chunk(ckpt, run):
    shardckpt.save({"a": torch.arange(2048.0), "b": torch.ones(2048)}, ckpt, codec="raw",
                   chunk_bytes=2048, files_per_rank=1)
    data = ckpt / "data" / os.listdir(ckpt / "data")[0]
    m = shardckpt.format.opening.open_manifest(*shardckpt.storage.open_checkpoint(ckpt))
    for key, i in (("a", 0), ("b", 3)):
        flip_byte(data, int(m.tensors[key].chunks[i, 1]) + 1)
    doc = run.json("verify", ckpt, status=1)
    assert not doc["ok"]
    assert [(p["tensor"], p["chunk"], p["error"]) for p in doc["problems"]] == [
        ("a", 0, "CorruptCheckpointError"), ("b", 3, "CorruptCheckpointError")]
    status, out, err = run("verify", ckpt)
    assert status == 1 and "FAILED" in out and f"data/{data.name}" in out
    assert err.count("\n") == 1 and err.startswith("shardckpt: CorruptCheckpointError: 2 ")


def test_verify_truncated_and_incomplete(ckpt, tmp_path, run):
    shardckpt.save({"w": torch.arange(1000.0)}, ckpt)
    data = ckpt / "data" / sorted(os.listdir(ckpt / "data"))[0]
    truncate(data, 10)
    doc = run.json("verify", ckpt, status=1)
    assert "truncated" in doc["problems"][0]["message"]
    (tmp_path / "half" / "data").mkdir(parents=True)
    status, out, err = run("verify", tmp_path / "half")
    assert status == 1 and out == ""
    assert err.startswith("shardckpt: IncompleteCheckpointError: ") and err.count("\n") == 1
    status, out, _ = run("inspect", tmp_path / "nothing", "--json")
    assert status == 1 and '"CheckpointNotFoundError"' in out  # scripts get JSON errors too


def test_corrupt_manifest_exit_1(ckpt, run):
    shardckpt.save({"w": torch.arange(10.0)}, ckpt)
    flip_byte(ckpt / "manifest.json", 30)
    for command in ("verify", "inspect"):
        status, _, err = run(command, ckpt)
        assert status == 1 and "CorruptCheckpointError" in err


def test_usage_errors_exit_2(run, root):
    assert run()[0] == 2
    assert run("nosuch")[0] == 2
    status, _, err = run("ls", root, "--storage-option", "novalue")
    assert status == 2 and "KEY=VALUE" in err
    assert run("gc", root, "--older-than", "soon")[0] == 2
    assert run("--help")[0] == 0


def test_storage_options_reach_the_library(run, root, monkeypatch):
    from shardckpt.cli import common
    seen = {}
    real = common.open_checkpoint

    def spy(path, storage_options=None):
        seen["options"] = storage_options
        return real(path, storage_options)
    monkeypatch.setattr(common, "open_checkpoint", spy)
    save_step(root, 1, {"w": torch.ones(3)})
    assert run("inspect", f"{root}/step-00000001", "-o", "anon=true", "-o", "n=3",
               "-o", "x=1.5", "-o", 'kw={"a": [1]}', "-o", "region=eu", "--json")[0] == 0
    assert seen["options"] == {"anon": True, "n": 3, "x": 1.5, "kw": {"a": [1]},
                               "region": "eu"}


def test_storage_failures_fail_with_one_line(run):
    # A protocol no fsspec backend knows: refused at once, without touching any network.
    status, _, err = run("verify", "nosuchstore://bucket/ckpt", "-o", "anon=true")
    assert status == 1 and err.startswith("shardckpt: StorageError: ") and err.count("\n") == 1


@pytest.mark.parametrize("launcher", ["script", "module"])
def test_installed_entry_points(ckpt, launcher):
    shardckpt.save({"w": torch.arange(10.0)}, ckpt)
    exe = os.path.join(os.path.dirname(sys.executable), "shardckpt")
    argv = [exe] if launcher == "script" else [sys.executable, "-m", "shardckpt"]
    done = subprocess.run(argv + ["verify", str(ckpt)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stderr
    flip_byte(ckpt / "manifest.json", 30)
    done = subprocess.run(argv + ["inspect", str(ckpt)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("shardckpt: CorruptCheckpointError")
    assert "Traceback" not in done.stderr
