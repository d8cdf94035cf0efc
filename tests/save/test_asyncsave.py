"""async_save: snapshot at the call, bounded staging, failures never lost, one save at a time."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import shardckpt
from shardckpt.codecs import status
from tests.helpers import assert_same


def _state(gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    return {"w": torch.randn(256, 1024, generator=gen), "b": torch.arange(1000),
            "nc": torch.randn(64, 64, generator=gen).t(), "step": 7}


@pytest.mark.parametrize("budget", [None, 1 << 20])  # whole copy, and streaming through 1 MiB
def test_checkpoint_holds_the_values_at_the_call(ckpt, budget):
    state = _state()
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    handle = shardckpt.async_save(state, ckpt, staging_budget_bytes=budget, chunk_bytes=1 << 16)
    for t in (state["w"], state["b"], state["nc"]):
        t.add_(1)  # the training goes on right away
    info = handle.result(timeout=60)
    assert handle.done() and info.raw_bytes == sum(
        v.numel() * v.element_size() for v in before.values() if isinstance(v, torch.Tensor))
    assert_same(before, shardckpt.load_full(ckpt))


def test_background_failure_surfaces_in_result_and_in_the_next_save(tmp_path, faults):
    faults.write_status(status.NO_SPACE, "No space left on device", 28)
    handle = shardckpt.async_save(_state(), tmp_path / "a")
    with pytest.raises(shardckpt.DiskFullError):
        handle.result(timeout=60)
    assert not (tmp_path / "a").exists()
    unobserved = shardckpt.async_save(_state(), tmp_path / "b")
    while not unobserved.done():
        time.sleep(0.01)
    faults.mp.undo()
    with pytest.raises(shardckpt.DiskFullError):  # nobody called result(): the next save says
        shardckpt.async_save(_state(), tmp_path / "c")
    shardckpt.async_save(_state(), tmp_path / "c").result(timeout=60)  # reported once only
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_overlapping_saves_wait_or_raise_as_asked(tmp_path, faults):
    faults.slow_writes(0.5)
    first = shardckpt.async_save(_state(1), tmp_path / "first")
    with pytest.raises(shardckpt.SaveInProgressError):
        shardckpt.async_save(_state(2), tmp_path / "second", on_busy="raise")
    second = shardckpt.async_save(_state(2), tmp_path / "second")  # waits for the first
    assert first.done()
    second.result(timeout=60)
    assert_same(_state(1), shardckpt.load_full(tmp_path / "first"))
    assert_same(_state(2), shardckpt.load_full(tmp_path / "second"))


def test_in_place_save_owns_its_name_from_the_call_and_replaces_atomically(tmp_path, faults):
    faults.slow_writes(0.3)
    path = tmp_path / "a"
    handle = shardckpt.async_save(_state(1), path, in_place=True)
    # The name is taken at once and nothing else shows; it is no checkpoint until committed.
    assert os.listdir(tmp_path) == ["a"] and not (path / "manifest.json").exists()
    with pytest.raises(shardckpt.IncompleteCheckpointError):
        shardckpt.load_full(path)
    handle.result(timeout=60)
    assert_same(_state(1), shardckpt.load_full(path))
    # Replacing a committed checkpoint still goes through a temporary folder: the old one
    # stays whole and loadable until the new one is in place.
    handle = shardckpt.async_save(_state(2), path, in_place=True, overwrite=True)
    assert_same(_state(1), shardckpt.load_full(path))
    handle.result(timeout=60)
    assert_same(_state(2), shardckpt.load_full(path))
    assert os.listdir(tmp_path) == ["a"]


def test_failed_in_place_save_leaves_no_folder(tmp_path, faults):
    faults.write_status(status.NO_SPACE, "No space left on device", 28)
    handle = shardckpt.async_save(_state(), tmp_path / "a", in_place=True)
    with pytest.raises(shardckpt.DiskFullError):
        handle.result(timeout=60)
    assert os.listdir(tmp_path) == []


def _run_child(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=os.getcwd(),
                            stdout=subprocess.PIPE, text=True, **kw)


def test_staging_memory_stays_within_the_budget(tmp_path):
    child = _run_child(f"""
        import resource, torch, shardckpt
        state = {{"w%d" % i: torch.randn(1 << 20) for i in range(64)}}  # 256 MiB
        shardckpt.save({{"x": torch.ones(1)}}, {str(tmp_path / "warm")!r})  # import-time costs
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        shardckpt.async_save(state, {str(tmp_path / "c")!r}, staging_budget_bytes=16 << 20,
                             codec="raw", pool_bytes=8 << 20).result()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    grown = int(out.split()[-1])
    assert grown <= (16 << 20) + (8 << 20) + (16 << 20), grown  # budget + pool + slack
    shardckpt.verify(tmp_path / "c")


def test_killed_during_background_write_keeps_the_previous_checkpoint(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    shardckpt.save({"x": torch.ones(4)}, old)
    child = _run_child(f"""
        import sys, pytest, torch, shardckpt
        from shardckpt.testing import Faults
        Faults(pytest.MonkeyPatch()).slow_writes(30)
        h = shardckpt.async_save({{"x": torch.zeros(1 << 20)}}, {str(new)!r})
        print("staged", flush=True)
        h.result()
    """)
    assert child.stdout.readline().strip() == "staged"
    time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.load_full(new)
    assert torch.equal(shardckpt.load_full(old)["x"], torch.ones(4))


def _threads() -> dict[int, tuple[str, int]]:
    """This process's threads: tid -> (OS name, nice)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{tid}/stat").read()
        except OSError:
            continue  # ended meanwhile
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        out[int(tid)] = (name, int(rest.split()[16]))  # field 19 of stat: nice
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_background_threads_are_named_and_yield_to_the_training(tmp_path):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    state = {f"w{i}": torch.randn(1 << 20) for i in range(16)}  # 64 MiB, many chunks
    seen: dict[int, tuple[str, int]] = {}
    handle = shardckpt.async_save(state, tmp_path / "a", chunk_bytes=1 << 18, codec="zstd")
    while not handle.done():  # sample while encoders and writers run
        seen.update(_threads())
    handle.result(timeout=60)
    seen.update(_threads())
    saving = [nice for name, nice in seen.values() if name == "sc-save"]
    # The writer thread and the native threads it started (they inherit its name and nice).
    assert len(saving) >= 2, seen
    assert all(nice == min(base + 10, 19) for nice in saving), seen
    main = _threads()[threading.get_native_id()]
    assert main[1] == base, main  # the caller's own priority is untouched
