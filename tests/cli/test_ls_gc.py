"""ls (steps, sizes, ratio, metrics, latest, best, leftovers) and gc (removes leftovers only)."""

import os
import time

import torch

from shardckpt.manage.manager import CheckpointManager

from .conftest import save_step


def _state(step):
    return {"model": {"w": torch.zeros(256) + step}, "step": step}


def _leftovers(root, age_seconds=7200):
    """An interrupted save of each kind, last touched ``age_seconds`` ago."""
    names = [".step-00000004.tmp-aa11", ".step-00000002.deleting-bb22", "step-00000005"]
    for name in names:
        os.makedirs(f"{root}/{name}/data")
        with open(f"{root}/{name}/data/rank-00000.bin", "wb") as f:
            f.write(b"x" * 100)
    with open(f"{root}/.latest.tmp-ee55", "wb") as f:  # the manager's latest file, unrenamed
        f.write(b"step-00000003\n")
    names.append(".latest.tmp-ee55")
    then = time.time() - age_seconds
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            os.utime(os.path.join(dirpath, n), (then, then))
    return names


def test_ls_reports_steps_latest_best_and_leftovers(root, run):
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
        save_step(root, step, _state(step), metrics={"loss": loss}, codec="zstd")
    with open(f"{root}/latest", "w") as f:
        f.write("step-00000003\n")
    _leftovers(root)
    doc = run.json("ls", root)
    rows = {r["name"]: r for r in doc["checkpoints"]}
    assert [r["step"] for r in doc["checkpoints"] if r["state"] == "committed"] == [1, 2, 3]
    assert (doc["latest"], doc["best"], doc["monitor"]) == (3, 2, "loss")  # inferred metric
    assert rows["step-00000002"]["best"] and rows["step-00000003"]["latest"]
    one = rows["step-00000001"]
    assert one["metrics"] == {"loss": 3.0} and one["raw_bytes"] == 256 * 4
    assert one["ratio"] == one["raw_bytes"] / one["stored_bytes"] > 1  # zeros compress
    on_disk = sum(os.path.getsize(os.path.join(d, f))
                  for d, _, fs in os.walk(f"{root}/step-00000001") for f in fs)
    assert one["bytes"] == on_disk
    assert rows["step-00000005"]["state"] == "uncommitted"
    assert rows[".step-00000004.tmp-aa11"]["state"] == "tmp"
    assert rows[".step-00000004.tmp-aa11"]["bytes"] == 100
    assert run.json("ls", root, "--monitor", "loss", "--mode", "max")["best"] == 1
    status, out, _ = run("ls", root)
    assert status == 0 and "best by loss (min): 2" in out and "uncommitted" in out


def test_ls_with_the_manager_and_no_common_metric(root, run):
    with CheckpointManager(root, async_save=False, handle_preemption=False) as mgr:
        mgr.save(10, _state(10), metrics={"loss": 1.0, "acc": 0.5})
        mgr.save(20, _state(20))
    doc = run.json("ls", root)
    assert (doc["latest"], doc["best"], doc["monitor"]) == (20, None, None)
    assert run.json("ls", root, "--monitor", "acc", "--mode", "max")["best"] == 10


def test_ls_shows_an_unreadable_checkpoint(root, run):
    path = save_step(root, 1, _state(1))
    with open(f"{path}/manifest.json", "r+b") as f:
        f.write(b"garbage")
    doc = run.json("ls", root)
    assert doc["checkpoints"][0]["state"] == "unreadable"
    assert "CorruptCheckpointError" in doc["checkpoints"][0]["error"]
    assert run("ls", f"{root}/missing")[0] == 1


def test_gc_removes_old_leftovers_and_never_a_committed_checkpoint(root, run):
    committed = [save_step(root, s, _state(s)) for s in (1, 2, 3)]
    leftovers = _leftovers(root)
    before = {p: sorted(os.listdir(f"{p}/data")) for p in committed}
    dry = run.json("gc", root, "--dry-run")
    assert sorted(r["name"] for r in dry["removed"]) == sorted(leftovers)
    assert all(os.path.exists(f"{root}/{n}") for n in leftovers)  # a dry run removes nothing
    doc = run.json("gc", root)
    assert sorted(r["name"] for r in doc["removed"]) == sorted(leftovers)
    assert doc["freed_bytes"] == 300 + len("step-00000003\n")
    assert sorted(os.listdir(root)) == ["step-00000001", "step-00000002", "step-00000003"]
    assert {p: sorted(os.listdir(f"{p}/data")) for p in committed} == before
    assert run("verify", committed[0])[0] == 0


def test_gc_keeps_young_leftovers_and_a_lone_old_copy(root, run):
    save_step(root, 1, _state(1))
    young = _leftovers(root, age_seconds=5)
    os.makedirs(f"{root}/.step-00000009.old-cc33/data")  # step 9 lost mid-replace: keep it
    os.makedirs(f"{root}/.step-00000001.old-dd44/data")  # step 1 was replaced: garbage
    doc = run.json("gc", root, "--older-than", "10m")
    kept = {r["name"]: r["reason"] for r in doc["kept"]}
    assert set(young) <= set(kept) and "younger" in kept[young[0]]
    assert "only copy of step 9" in kept[".step-00000009.old-cc33"]
    assert doc["removed"] == []  # .step-1.old is new too
    doc = run.json("gc", root, "--older-than", "0")
    assert sorted(r["name"] for r in doc["removed"]) == sorted(young + [".step-00000001.old-dd44"])
    assert sorted(os.listdir(root)) == [".step-00000009.old-cc33", "step-00000001"]


def test_gc_with_unknown_ages_keeps_everything(root, run, monkeypatch):
    from shardckpt.storage import LocalStorage
    monkeypatch.setattr(LocalStorage, "modified", lambda self, path: None)
    _leftovers(root)
    doc = run.json("gc", root)
    assert doc["removed"] == [] and all("age unknown" in r["reason"] for r in doc["kept"])
