"""Demotion to weights only (FORMAT.md 3.6.4): what stays loadable, what space comes back, that
incremental references stay valid, and that a failure at any storage request leaves every
checkpoint loadable in its old or its new form."""

import json
import os
import shutil
import uuid

import pytest
import torch

import shardckpt
from shardckpt.format.demote import demote, is_weights
from shardckpt.policy import KeepFull, KeepSteps
from shardckpt.storage import open_storage
from shardckpt.testing.faulty_storage import FaultPlan, FaultyStorage
from tests.helpers import assert_same

META = "shardckpt.manager"


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)},
            "optim": {"exp_avg": torch.randn(64, 64, generator=g),
                      "exp_avg_sq": torch.rand(64, 64, generator=g), "step": step},
            "rng": torch.arange(300, dtype=torch.uint8), "step": step}


def _blank() -> dict:
    return {"model": {"w": torch.zeros(64, 64), "b": torch.zeros(64)},
            "optim": {"exp_avg": torch.zeros(64, 64), "exp_avg_sq": torch.zeros(64, 64),
                      "step": 0}, "rng": torch.zeros(300, dtype=torch.uint8), "step": 0}


def _bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def _mgr(root, **kw):
    kw.setdefault("async_save", False)
    kw.setdefault("handle_preemption", False)
    return shardckpt.CheckpointManager(root, **kw)


def _form(path, step: int) -> str:
    """``full`` or ``weights``: which form checkpoint ``path`` loads in (asserting its values)."""
    got = shardckpt.load_full(path)
    shardckpt.verify(path)
    if set(got) == {"model"}:
        assert_same(_state(step)["model"], got["model"])
        return "weights"
    assert_same(_state(step), got)
    return "full"


def test_the_manager_demotes_all_but_the_newest_and_the_best(tmp_path):
    metrics = {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0, 5: 4.0}
    with _mgr(tmp_path, demote=KeepFull(last=2, best=1), monitor="loss") as mgr:
        for step, loss in metrics.items():
            mgr.save(step, _state(step), {"loss": loss})
        kinds = {r["step"]: (r["kind"], r["state"]) for r in mgr.history()}
    assert kinds == {1: ("weights", "demoted"), 2: ("full", "kept"), 3: ("weights", "demoted"),
                     4: ("full", "kept"), 5: ("full", "kept")}
    for step, kind in kinds.items():
        assert _form(tmp_path / f"step-{step:08d}", step) == kind[0]
    full, weights = _bytes(tmp_path / "step-00000002"), _bytes(tmp_path / "step-00000001")
    assert weights < 0.45 * full  # the optimizer's two 64x64 moments and the rng are gone
    model = {"model": {"w": torch.zeros(64, 64), "b": torch.zeros(64)}}
    shardckpt.load(model, tmp_path / "step-00000001")
    assert torch.equal(model["model"]["w"], _state(1)["model"]["w"])
    with _mgr(tmp_path, lease=False) as mgr:
        mgr.export_weights(3, tmp_path / "w.safetensors")
    assert os.path.getsize(tmp_path / "w.safetensors") > 64 * 64 * 4
    from safetensors.torch import load_file
    from shardckpt import cli
    assert cli.main(["convert", str(tmp_path / "step-00000001"), str(tmp_path / "hf"), "--to",
                     "hf", "--weights-only"]) == 0
    exported = {}
    for f in os.listdir(tmp_path / "hf"):
        if f.endswith(".safetensors"):
            exported.update(load_file(str(tmp_path / "hf" / f)))
    assert torch.equal(exported["w"], _state(1)["model"]["w"])  # bit-exact through HF export


def test_restore_never_resumes_from_a_weights_checkpoint(tmp_path):
    with _mgr(tmp_path, demote=KeepFull(last=1)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
    os.remove(tmp_path / "step-00000003" / "manifest.json")  # the only full one is gone
    with _mgr(tmp_path) as mgr:
        with pytest.raises(shardckpt.errors.NoResumableCheckpointError,
                           match="step-00000002.*no optimizer state"):
            mgr.restore(_blank())


def test_incremental_references_stay_valid(tmp_path):
    with _mgr(tmp_path, incremental=True, demote=KeepFull(last=1)) as mgr:
        for step in (1, 2, 3):
            state = _state(1)  # nothing changes: later saves reference step 1's chunks
            state["step"] = step
            mgr.save(step, state)
    manifest = json.loads((tmp_path / "step-00000003" / "manifest.json").read_bytes()[:-1]
                          .rsplit(b',"manifest_crc32c"', 1)[0] + b"}")
    assert {f.get("base") for f in manifest["files"]} == {"step-00000001"}
    assert is_weights(json.loads((tmp_path / "step-00000001" / "manifest.json").read_text(
        ).rsplit(',"manifest_crc32c"', 1)[0] + "}")["metadata"], META)
    got = shardckpt.load_full(tmp_path / "step-00000003")
    expected = _state(1)
    expected["step"] = 3
    assert_same(expected, got)
    # Step 1's original file stays: step 3 references it.
    assert (tmp_path / "step-00000001" / "data" / "rank-00000.bin").exists()


def _template(root, n: int = 2) -> None:
    with _mgr(root) as mgr:
        for step in range(1, n + 1):
            mgr.save(step, _state(step))


def _requests(storage_url: str, name: str) -> int:
    plan = FaultPlan()
    demote(FaultyStorage(open_storage(storage_url), plan), name)
    return len(plan.log)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_failure_at_any_request_leaves_old_or_new_form(tmp_path, where):
    template = tmp_path / "template"
    _template(template)
    url_of = (lambda k: str(tmp_path / f"run{k}")) if where == "local" else \
        (lambda k: f"memory://demote-{uuid.uuid4().hex}/r{k}")
    first = url_of(0)
    _copy(template, first)
    total = _requests(first, "step-00000001")
    assert total > 5
    forms = set()
    for k in range(1, total + 1):
        url = url_of(k)
        _copy(template, url)
        storage = FaultyStorage(open_storage(url), FaultPlan(fail_at=k, kind="permanent"))
        try:
            demote(storage, "step-00000001")
        except (OSError, shardckpt.errors.CheckpointError):
            pass
        forms.add(_check_forms(url))
        demote(open_storage(url), "step-00000001")  # the next attempt finishes it
        assert _check_forms(url) == "weights"
    assert forms == {"full", "weights"}  # some failures came before the commit, some after


def _copy(template, url: str) -> None:
    if "://" not in url:
        shutil.copytree(template, url)
        return
    storage = open_storage(url)
    for d, _, files in os.walk(template):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), template)
            storage.write(rel, open(os.path.join(d, f), "rb").read(), durable=False,
                          exclusive=False)


def _check_forms(url: str) -> str:
    """Step 2 is untouched; step 1 loads in one of its two forms, which is returned."""
    if "://" in url:
        load = lambda name: shardckpt.load_full(f"{url}/{name}")  # noqa: E731
    else:
        load = lambda name: shardckpt.load_full(os.path.join(url, name))  # noqa: E731
    assert_same(_state(2), load("step-00000002"))
    got = load("step-00000001")
    if set(got) == {"model"}:
        assert_same(_state(1)["model"], got["model"])
        return "weights"
    assert_same(_state(1), got)
    return "full"


def test_a_leftover_demotion_manifest_is_collected(tmp_path):
    _template(tmp_path, 1)
    leftover = tmp_path / ".step-00000001.demote-ab12cd34"
    leftover.write_bytes(b"{}")
    os.utime(leftover, (0, 0))
    from shardckpt.manage.layout import collect_garbage
    removed, _ = collect_garbage(open_storage(str(tmp_path)), older_than=60)
    assert [r["name"] for r in removed] == [leftover.name]
    assert _check_forms_one(tmp_path) == "full"


def _check_forms_one(root) -> str:
    got = shardckpt.load_full(root / "step-00000001")
    assert_same(_state(1), got)
    return "full"


def _demote_slowly(root: str) -> None:
    plan = FaultPlan(latency=0.004)  # every request a little slow: kills land everywhere
    demote(FaultyStorage(open_storage(root), plan), "step-00000001")
    os._exit(0)


def test_a_kill_at_any_instant_leaves_old_or_new_form(tmp_path):
    """SIGKILL of a process demoting, at spread times (data writes bypass the storage wrapper
    on local disks, so kills also land inside them)."""
    import multiprocessing
    import signal
    import time
    template = tmp_path / "template"
    _template(template)
    ctx = multiprocessing.get_context("fork")
    forms = []
    for i, delay in enumerate([0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 1.0]):
        root = str(tmp_path / f"kill{i}")
        shutil.copytree(template, root)
        child = ctx.Process(target=_demote_slowly, args=(root,))
        child.start()
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        forms.append(_check_forms(root))
        demote(open_storage(root), "step-00000001")  # the next attempt finishes and sweeps
        assert _check_forms(root) == "weights"
        data = os.listdir(os.path.join(root, "step-00000001", "data"))
        assert data and all(n.startswith("weights-") for n in data)  # the old files are gone
    assert forms[0] == "full" and forms[-1] == "weights", forms


def test_a_demoted_checkpoints_old_files_go_with_their_last_user(tmp_path):
    with _mgr(tmp_path, incremental=True, demote=KeepFull(last=1)) as mgr:
        for step in (1, 2):
            state = _state(1)
            state["step"] = step
            mgr.save(step, state)  # step 2 references step 1's unchanged chunks
    data = tmp_path / "step-00000001" / "data"
    assert any(n.startswith("rank-") for n in os.listdir(data))  # held by step 2
    with _mgr(tmp_path, keep=KeepSteps([1, 3]), demote=KeepFull(last=1)) as mgr:
        mgr.save(3, _state(3))  # step 2 goes: step 1's old files are no one's any more
    assert sorted(n[:8] for n in os.listdir(data)) == ["weights-"] * len(os.listdir(data))
    assert _form(tmp_path / "step-00000001", 1) == "weights"
