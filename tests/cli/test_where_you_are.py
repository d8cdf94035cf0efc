"""The command line tells a user who pointed it at the wrong kind of path what the path is and
which command fits: ls on one checkpoint, inspect on a manager root, a folder of checkpoints or a
manifest.json; and diff's exit status and ``equal`` follow diff(1)."""

import json
import os

import shardckpt

from .conftest import save_step


def test_ls_on_one_checkpoint_suggests_inspect(root, run, model_state):
    path = save_step(root, 3, model_state)
    status, out, err = run("ls", path)
    assert status == 2 and out == ""
    assert "is one checkpoint" in err and f"shardckpt inspect {path}" in err
    status, out, err = run("ls", path, "--json")
    doc = json.loads(out)
    assert status == 2 and doc["error"]["type"] == "UsageError"
    assert f"shardckpt inspect {path}" in doc["error"]["message"]
    assert run("ls", os.path.join(path, "manifest.json"))[0] == 2


def test_ls_on_a_folder_of_other_checkpoints_names_them(tmp_path, run, model_state):
    folder = tmp_path / "ckpt"  # how Lightning's ModelCheckpoint names its checkpoints
    shardckpt.save(model_state, str(folder / "epoch=0-step=9.ckpt"))
    shardckpt.save(model_state, str(folder / "last.ckpt"))
    status, out, _ = run("ls", folder)
    assert status == 0 and "2 other checkpoint folder(s)" in out
    assert f"shardckpt inspect {folder}/last.ckpt" in out
    doc = run.json("ls", folder)
    assert doc["checkpoints"] == [] and doc["other_checkpoints"] == ["epoch=0-step=9.ckpt",
                                                                     "last.ckpt"]


def test_ls_on_a_root_is_unchanged(root, run, model_state):
    save_step(root, 1, model_state)
    doc = run.json("ls", root)
    assert [r["step"] for r in doc["checkpoints"]] == [1] and doc["other_checkpoints"] == []


def test_inspect_on_a_root_says_it_is_one(root, run, model_state):
    save_step(root, 1, model_state)
    save_step(root, 2, model_state)
    status, out, err = run("inspect", root)
    assert status == 2 and "never committed" not in err
    assert "manager root holding 2 committed checkpoint(s)" in err
    assert f"shardckpt ls {root}" in err and f"shardckpt inspect {root}/step-00000002" in err


def test_inspect_on_a_folder_of_checkpoints(tmp_path, run, model_state):
    shardckpt.save(model_state, str(tmp_path / "ckpt" / "last.ckpt"))
    status, _, err = run("inspect", tmp_path / "ckpt")
    assert status == 2 and "folder of 1 checkpoint(s) (last.ckpt)" in err


def test_inspect_on_a_manifest_reads_its_checkpoint(root, run, model_state):
    path = save_step(root, 1, model_state)
    doc = run.json("inspect", os.path.join(path, "manifest.json"))
    assert doc["path"] == path and "model/w" in doc["tensors"]


def test_inspect_on_an_empty_folder_still_says_no_manifest(tmp_path, run):
    (tmp_path / "empty").mkdir()
    status, _, err = run("inspect", tmp_path / "empty")
    assert status == 1 and "manifest.json" in err


def test_diff_exit_status_follows_diff1(root, run, model_state):
    a = save_step(root, 1, model_state, metrics={"loss": 1.0})
    same = save_step(root, 2, model_state, metrics={"loss": 0.5})  # metrics are not content
    changed = dict(model_state, model=dict(model_state["model"], w=model_state["model"]["w"] + 1))
    other = save_step(root, 3, changed)
    doc = run.json("diff", a, same)
    assert doc["equal"] is True
    status, out, _ = run("diff", a, same)
    assert status == 0 and out.rstrip().endswith("equal")
    doc = run.json("diff", a, other, status=1)
    assert doc["equal"] is False
    status, out, _ = run("diff", a, other)
    assert status == 1 and out.rstrip().endswith("differ")
    value_only = save_step(root, 4, dict(model_state, lr=0.5))
    assert run.json("diff", a, value_only, status=1)["equal"] is False
    status, out, err = run("diff", a, f"{root}/step-00000099", "--json")
    assert status == 2 and json.loads(out)["error"]["type"] and "step-00000099" in err
