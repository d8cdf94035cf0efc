"""The CLI on incremental checkpoints: ls shows bytes written against bytes referenced, copy and
convert materialise references, gc keeps retired files in use, verify follows references."""

import os

import torch

import shardckpt
from shardckpt.format import retire
from shardckpt.storage import LocalStorage

from .conftest import save_step


def _two_steps(root):
    torch.manual_seed(0)
    state = {"model": {"frozen": torch.randn(8192), "live": torch.randn(2048)}, "step": 1}
    save_step(root, 1, state, codec="raw", chunk_bytes=4096, content_hashes=True)
    state["model"]["live"] += 1
    state["step"] = 2
    save_step(root, 2, state, codec="raw", chunk_bytes=4096, base="step-00000001")
    return state


def test_ls_shows_written_and_referenced_bytes(root, run):
    _two_steps(root)
    rows = {r["step"]: r for r in run.json("ls", root)["checkpoints"]}
    assert (rows[1]["written_bytes"], rows[1]["referenced_bytes"]) == (40960, 0)
    assert (rows[2]["written_bytes"], rows[2]["referenced_bytes"]) == (8192, 32768)
    on_disk = sum(os.path.getsize(os.path.join(d, f))
                  for d, _, fs in os.walk(f"{root}/step-00000002") for f in fs)
    assert rows[2]["bytes"] == on_disk  # its own files only
    status, out, _ = run("ls", root)
    assert status == 0 and "referenced" in out and "32.0 KiB" in out


def test_copy_and_convert_materialise_and_verify_follows(root, run, tmp_path):
    state = _two_steps(root)
    status, out, _ = run("verify", f"{root}/step-00000002")
    assert status == 0
    doc = run.json("copy", f"{root}/step-00000002", tmp_path / "standalone")
    assert doc["materialised"] >= 1
    status, _, _ = run("convert", f"{root}/step-00000002", "--to", "torch",
                       tmp_path / "weights.pt", "--weights-only")
    assert status == 0
    storage = LocalStorage(root)
    for name in ("step-00000001", "step-00000002"):
        retire.remove_checkpoint(storage, name)
    retire.sweep_all(storage)
    assert os.listdir(root) == []
    loaded = shardckpt.load_full(tmp_path / "standalone")
    assert torch.equal(loaded["model"]["live"], state["model"]["live"])
    exported = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert torch.equal(exported["frozen"], state["model"]["frozen"])


def test_gc_reports_a_retired_folder_in_use(root, run):
    _two_steps(root)
    retire.remove_checkpoint(LocalStorage(root), "step-00000001")
    doc = run.json("gc", root, "--older-than", "0s")
    assert [r["name"] for r in doc["kept"]] == ["step-00000001"]
    assert doc["kept"][0]["kind"] == "retired" and doc["removed"] == []
    assert shardckpt.verify(f"{root}/step-00000002").ok
    rows = {r["name"]: r for r in run.json("ls", root)["checkpoints"]}
    assert rows["step-00000001"]["state"] == "retired"
