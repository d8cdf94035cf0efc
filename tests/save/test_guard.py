"""Guarded async_save: optimizer-owned tensors copied after the call, step() waits, never torn."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import shardckpt
from tests.helpers import assert_same

MIB = 1 << 20


def _model(seed=0, width=256):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width),
                               torch.nn.Linear(width, 8))


def _trained(width=256):
    """A model and its AdamW after one step (the moments exist)."""
    model = _model(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, [opt])
    return model, opt


def _train(model, opts, n=1):
    for _ in range(n):
        for o in opts:
            o.zero_grad()
        model(torch.randn(16, model[0].in_features)).square().mean().backward()
        for o in opts:
            o.step()


def _snapshot(model, opts):
    """The values the checkpoint must hold: clones of everything, taken at the call."""
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optim": [{"state": {p: {k: clone(v) for k, v in s.items()}
                                 for p, s in o.state_dict()["state"].items()}} for o in opts]}


def _saved(path, n_opts):
    loaded = shardckpt.load_full(path)
    return {"model": loaded["model"],
            "optim": [{"state": loaded["optim"][i]["state"]} for i in range(n_opts)]}


def _release_later(path, seconds):
    threading.Timer(seconds, lambda: open(path, "w").close()).start()


@pytest.mark.parametrize("budget", [None, 1 * MIB])  # whole copy; streaming through 1 MiB
def test_step_right_after_the_call_leaves_the_values_at_the_call(tmp_path, budget):
    model, opt = _trained(512)
    for k in range(3):  # several saves in a row, each followed at once by a step
        expected = _snapshot(model, [opt])
        handle = shardckpt.async_save({"model": model, "optim": [opt]}, tmp_path / f"c{k}",
                                      guard=opt, staging_budget_bytes=budget,
                                      chunk_bytes=64 << 10)
        _train(model, [opt])
        handle.result(timeout=120)
        assert handle.staged()
        assert_same(expected, _saved(tmp_path / f"c{k}", 1))
    assert len(opt._optimizer_step_pre_hooks) <= 1  # only the last save's retired hook is left


def test_a_step_during_streaming_waits_for_the_copy(tmp_path, faults):
    model = _model(width=1024)  # ~4 MiB of weights, 12 MiB with the moments, through 1 MiB
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, [opt])
    expected = _snapshot(model, [opt])
    release = tmp_path / "release"
    faults.stall_in_write(release)  # the first batch's write hangs: both slots stay full
    handle = shardckpt.async_save({"model": model, "optim": [opt]}, tmp_path / "c", guard=opt,
                                  staging_budget_bytes=1 * MIB, chunk_bytes=64 << 10)
    assert not handle.staged()  # the caller did not wait for the guarded tensors
    _release_later(release, 0.5)
    _train(model, [opt])  # its step waits (pre-hook) until the rest has streamed through
    assert handle.staged() and handle.wait_seconds >= 0.3
    handle.result(timeout=120)
    assert_same(expected, _saved(tmp_path / "c", 1))


def test_an_optimizer_inside_the_state_is_a_guard(tmp_path, faults):
    model = _model(width=1024)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, [opt])
    expected = _snapshot(model, [opt])
    release = tmp_path / "release"
    faults.stall_in_write(release)
    handle = shardckpt.async_save({"model": model, "optim": [opt]}, tmp_path / "c",
                                  staging_budget_bytes=1 * MIB)
    assert not handle.staged() and len(opt._optimizer_step_pre_hooks) == 1
    _release_later(release, 0.3)
    _train(model, [opt])
    handle.result(timeout=120)
    assert_same(expected, _saved(tmp_path / "c", 1))


def test_an_unguarded_buffer_changed_right_after_the_call_is_saved_as_at_the_call(tmp_path):
    model, opt = _trained()
    expected = _snapshot(model, [opt])
    extra = torch.arange(1000.0)
    handle = shardckpt.async_save({"model": model, "optim": [opt], "extra": extra},
                                  tmp_path / "c", guard=opt)
    model[1].running_mean.add_(1)  # buffers and unowned tensors were copied before the return
    model[1].num_batches_tracked.add_(1)
    extra.mul_(2)
    handle.result(timeout=120)
    saved = _saved(tmp_path / "c", 1)
    assert_same(expected, saved)
    assert torch.equal(shardckpt.load_full(tmp_path / "c")["extra"], torch.arange(1000.0))


def test_a_guarded_tensor_changed_outside_the_optimizer_fails_the_save(tmp_path, faults):
    model, opt = _trained(1024)
    state = {"model": model, "optim": [opt]}
    shardckpt.save(state, tmp_path / "old")
    old = shardckpt.load_full(tmp_path / "old")
    release = tmp_path / "release"
    faults.stall_in_write(release)
    handle = shardckpt.async_save(state, tmp_path / "new", guard=opt,
                                  staging_budget_bytes=1 * MIB)
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # 4 MiB: most of it is not copied yet
    open(release, "w").close()
    with pytest.raises(shardckpt.StateChangedError) as err:
        handle.result(timeout=120)
    assert err.value.tensor == "model/0.weight"
    assert "model/0.weight" in str(err.value) and "wait_staged" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "release"]  # no temp folder
    assert_same(old, shardckpt.load_full(tmp_path / "old"))
    _train(model, [opt])  # the hook does not block a step after the failure
    faults.mp.undo()
    shardckpt.async_save(state, tmp_path / "again", guard=opt).result(timeout=120)


def test_wait_staged_lets_other_code_change_guarded_tensors(tmp_path, faults):
    model, opt = _trained(1024)
    expected = _snapshot(model, [opt])
    release = tmp_path / "release"
    faults.stall_in_write(release)
    handle = shardckpt.async_save({"model": model, "optim": [opt]}, tmp_path / "c", guard=opt,
                                  staging_budget_bytes=1 * MIB)
    with pytest.raises(TimeoutError):
        handle.wait_staged(timeout=0.2)
    _release_later(release, 0.2)
    handle.wait_staged(timeout=120)
    with torch.no_grad():
        model[0].weight.zero_()  # allowed now: everything is copied
    handle.result(timeout=120)
    assert handle.wait_seconds > 0.2
    assert_same(expected, _saved(tmp_path / "c", 1))


def test_two_optimizers_each_guarded(tmp_path):
    model = _model(width=512)
    first = torch.optim.AdamW(model[0].parameters(), lr=1e-2)
    second = torch.optim.SGD(list(model[1].parameters()) + list(model[2].parameters()),
                             lr=0.1, momentum=0.9)
    opts = [first, second]
    _train(model, opts)
    for k in range(2):
        expected = _snapshot(model, opts)
        handle = shardckpt.async_save({"model": model, "optim": opts}, tmp_path / f"c{k}",
                                      guard=opts, staging_budget_bytes=1 * MIB,
                                      chunk_bytes=64 << 10)
        assert all(len(o._optimizer_step_pre_hooks) >= 1 for o in opts) or handle.staged()
        _train(model, opts)
        handle.result(timeout=120)
        assert_same(expected, _saved(tmp_path / f"c{k}", 2))


def test_guard_must_be_an_optimizer(tmp_path):
    with pytest.raises(TypeError, match="Optimizer"):
        shardckpt.async_save({"x": torch.ones(2)}, tmp_path / "c", guard=object())


def test_manager_with_a_guard_resumes_bit_exact(tmp_path):
    model = _model(width=512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snapshots = {}
    with shardckpt.CheckpointManager(tmp_path / "run", every_n_steps=2, keep_last=2, guard=opt,
                                     handle_preemption=False,
                                     save_options={"staging_budget_bytes": 1 * MIB}) as mgr:
        for step in range(1, 7):
            _train(model, [opt])
            if step % 2 == 0:
                snapshots[step] = _snapshot(model, [opt])
            mgr.maybe_save(step, {"model": model, "optim": [opt]})
    assert mgr.steps() == [4, 6]
    fresh = _model(seed=1, width=512)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    with shardckpt.CheckpointManager(tmp_path / "run", handle_preemption=False) as mgr:
        assert mgr.restore({"model": fresh, "optim": [fresh_opt]}) == 6
    assert_same(snapshots[6], _snapshot(fresh, [fresh_opt]))


def test_manager_reports_a_state_change_like_any_failed_save(tmp_path, faults):
    model, opt = _trained(1024)
    release = tmp_path / "release"
    mgr = shardckpt.CheckpointManager(tmp_path / "run", guard=opt, handle_preemption=False,
                                      save_options={"staging_budget_bytes": 1 * MIB})
    mgr.save(1, {"model": model, "optim": [opt]})
    mgr.wait()
    faults.stall_in_write(release)
    mgr.save(2, {"model": model, "optim": [opt]})
    with torch.no_grad():
        model[0].weight.add_(1)
    open(release, "w").close()
    with pytest.raises(shardckpt.StateChangedError):
        mgr.close()
    assert shardckpt.CheckpointManager(tmp_path / "run", handle_preemption=False).steps() == [1]


def test_unguarded_save_keeps_todays_semantics(tmp_path):
    model, opt = _trained()
    expected = _snapshot(model, [opt])
    start = time.perf_counter()
    handle = shardckpt.async_save({"model": model.state_dict(),
                                   "optim": [opt.state_dict()]}, tmp_path / "c")
    assert handle.staged() and handle.wait_seconds == 0.0 and time.perf_counter() > start
    assert not opt._optimizer_step_pre_hooks
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # no guard: everything was copied before the return
    handle.result(timeout=120)
    assert_same(expected, _saved(tmp_path / "c", 1))


def test_hooks_of_earlier_saves_are_removed(tmp_path):
    model, opt = _trained()
    for k in range(4):
        shardckpt.async_save({"model": model, "optim": [opt]}, tmp_path / f"c{k}",
                             guard=opt).result(timeout=120)
        _train(model, [opt])
    assert len(opt._optimizer_step_pre_hooks) <= 1


@pytest.mark.parametrize("guarded", [False, True])
def test_a_save_adds_at_most_its_budget_encode_pool_included(tmp_path, guarded):
    """As a new user measures it: a fresh process, no warm-up save, the peak RSS (VmHWM)."""
    out = subprocess.run(
        [sys.executable, "scripts/measure_rss.py", "--state-mib", "192", "--budget-mib", "32",
         "--dir", str(tmp_path)] + (["--guard"] if guarded else []),
        capture_output=True, text=True, timeout=300, check=True,
        env={**os.environ, "PYTHONPATH": "."})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ratio"] <= 1.10, result


def test_guarded_incremental_manager_saves_hold_the_values_at_each_call(tmp_path):
    """Guard and incremental together: a frozen layer is referenced, the trained one is copied
    lazily while step() runs right after each save, and every step loads bit-exactly."""
    model, opt = _trained()
    for p in model[0].parameters():  # frozen: no grad, never in a step, so its chunks repeat
        p.requires_grad_(False)
    mgr = shardckpt.CheckpointManager(tmp_path / "ckpt", every_n_steps=1, incremental=True,
                                      guard=opt, handle_preemption=False)
    expected = {}
    for step in range(1, 4):
        expected[step] = _snapshot(model, [opt])
        mgr.maybe_save(step, {"model": model, "optim": [opt]})
        _train(model, [opt])  # the pre-hook waits for the lazy copy, then the step changes it
    mgr.close()
    sizes = {}
    for step, want in expected.items():
        assert_same(_saved(mgr.path(step), 1), want)
        manifest = json.loads(open(os.path.join(mgr.path(step), "manifest.json")).read())
        sizes[step] = sum(f.get("size", 0) for f in manifest["files"] if "base" not in f)
    assert sizes[3] < sizes[1]  # the frozen layer is not written again
