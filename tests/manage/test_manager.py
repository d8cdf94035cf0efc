"""CheckpointManager in one process: schedules, retention, restore fallback, preemption, export."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import shardckpt
from shardckpt import CheckpointManager
from shardckpt.codecs import status
from shardckpt.manage.manager import step_name
from shardckpt.testing import flip_byte


def _state(step: int) -> dict:
    return {"w": torch.full((8, 8), float(step)), "step": step}


def _blank() -> dict:
    return {"w": torch.zeros(8, 8), "step": -1}


def _mgr(root, **kw) -> CheckpointManager:
    kw.setdefault("async_save", False)
    kw.setdefault("handle_preemption", False)
    return CheckpointManager(root, **kw)


def corrupt(ckpt_dir) -> None:
    """Flip a byte in the middle of the checkpoint's largest data file."""
    data = os.path.join(ckpt_dir, "data")
    path = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
    flip_byte(path, os.path.getsize(path) // 2 + 8)


class Retention(RuleBasedStateMachine):
    """Saves with and without metrics, corruptions and restores against a model of the rules:
    after each commit the folder holds exactly the newest ``keep_last`` ever saved, the best
    ``keep_best`` ever saved, and the newest; restore loads the newest sound one."""

    @initialize(keep_last=st.one_of(st.none(), st.integers(1, 3)),
                keep_best=st.one_of(st.none(), st.integers(1, 2)),
                mode=st.sampled_from(["min", "max"]))
    def setup(self, keep_last, keep_best, mode):
        self.root = tempfile.mkdtemp(prefix="retention-")
        self.mgr = _mgr(self.root, keep_last=keep_last, keep_best=keep_best, monitor="loss",
                        mode=mode)
        self.keep_last, self.keep_best, self.mode = keep_last, keep_best, mode
        self.saved: dict[int, float | None] = {}
        self.corrupt: set[int] = set()
        self.step = 0

    def teardown(self):
        import shutil
        if hasattr(self, "mgr"):
            self.mgr.close()
            shutil.rmtree(self.root, ignore_errors=True)

    @rule(gap=st.integers(1, 3), loss=st.one_of(st.none(), st.integers(0, 6)))
    def save(self, gap, loss):
        self.step += gap
        self.mgr.save(self.step, _state(self.step), None if loss is None else {"loss": loss})
        self.saved[self.step] = loss

    @precondition(lambda self: self.mgr.steps())
    @rule(data=st.data())
    def damage(self, data):
        step = data.draw(st.sampled_from(self.mgr.steps()))
        if step not in self.corrupt:
            corrupt(self.mgr.path(step))
            self.corrupt.add(step)

    @rule()
    def restore(self):
        steps = self.mgr.steps()
        sound = [s for s in steps if s not in self.corrupt]
        expected = max(sound) if sound else None
        state = _blank()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = self.mgr.restore(state)
        assert got == expected
        skipped = [s for s in steps if expected is None or s > expected]
        assert len(caught) == len(skipped)  # one warning per skipped (corrupt) checkpoint
        if got is not None:
            assert state["step"] == got and torch.equal(state["w"], _state(got)["w"])

    @invariant()
    def kept_exactly(self):
        if not hasattr(self, "mgr"):
            return
        ordered = sorted(self.saved)
        if self.keep_last is None and self.keep_best is None:
            expected = set(ordered)
        else:
            expected = set(ordered[-1:]) | set(ordered[-self.keep_last:] if self.keep_last else [])
            scored = [(v if self.mode == "min" else -v, -s) for s, v in self.saved.items()
                      if v is not None]
            expected |= {-s for _, s in sorted(scored)[: self.keep_best or 0]}
        assert set(self.mgr.steps()) == expected


TestRetention = Retention.TestCase
TestRetention.settings = settings(max_examples=12, stateful_step_count=12, deadline=None)


def test_every_n_steps_and_no_duplicate_after_restore(tmp_path):
    with _mgr(tmp_path, every_n_steps=3) as mgr:
        saved = [s for s in range(1, 10) if mgr.maybe_save(s, _state(s))]
        assert saved == [3, 6, 9] and mgr.steps() == [3, 6, 9]
    with _mgr(tmp_path, every_n_steps=3) as mgr:
        state = _blank()
        assert mgr.restore(state) == 9 and state["step"] == 9
        assert not mgr.maybe_save(9, state)  # already on disk
        assert mgr.maybe_save(12, _state(12))


def test_every_n_seconds_uses_the_clock(tmp_path):
    now = [100.0]
    with _mgr(tmp_path, every_n_seconds=10, clock=lambda: now[0]) as mgr:
        assert not mgr.maybe_save(1, _state(1))
        now[0] += 10
        assert mgr.maybe_save(2, _state(2))
        now[0] += 5
        assert not mgr.maybe_save(3, _state(3))
        now[0] += 5
        assert mgr.maybe_save(4, _state(4))
        assert mgr.steps() == [2, 4]


def test_metrics_latest_and_best(tmp_path):
    with _mgr(tmp_path, monitor="acc", mode="max") as mgr:
        mgr.save(1, _state(1), {"acc": torch.tensor(0.5)})
        mgr.save(2, _state(2), {"acc": 0.9})
        mgr.save(3, _state(3), {"acc": float("nan")})
        assert mgr.metrics(2) == {"acc": 0.9} and mgr.metrics(3) == {"acc": None}
        assert mgr.best_step() == 2
        assert (tmp_path / "latest").read_text().strip() == step_name(3)
    assert _mgr(tmp_path, monitor="acc", mode="max").metrics(1) == {"acc": 0.5}  # from disk


def test_async_saves_commit_in_background_and_failures_surface(tmp_path, faults):
    with _mgr(tmp_path, every_n_steps=1, async_save=True, keep_last=2) as mgr:
        for s in range(1, 5):
            assert mgr.maybe_save(s, _state(s))
        mgr.wait()
        assert mgr.steps() == [3, 4]
        faults.write_status(status.IO_ERROR, "injected disk failure", 5)
        mgr.maybe_save(5, _state(5))
        with pytest.raises(shardckpt.StorageError, match="injected disk failure"):
            mgr.wait()
        faults.mp.undo()
        assert mgr.steps() == [3, 4]  # nothing partial, nothing deleted


def test_restore_skips_incomplete_and_corrupt_and_raises_on_mismatch(tmp_path):
    with _mgr(tmp_path) as mgr:
        for s in (1, 2, 3, 4):
            mgr.save(s, _state(s))
        corrupt(mgr.path(4))
        os.remove(os.path.join(mgr.path(3), "manifest.json"))  # as if never committed
        state = _blank()
        with pytest.warns(UserWarning, match=r"step-00000004: CorruptCheckpointError"):
            assert mgr.restore(state) == 2
        assert torch.equal(state["w"], _state(2)["w"])
        with pytest.raises(shardckpt.CheckpointNotFoundError):
            mgr.restore(_blank(), step=3)
        with pytest.raises(shardckpt.CorruptCheckpointError):
            mgr.restore(_blank(), step=4)
        with pytest.raises(shardckpt.StateMismatchError):  # an older one would not fit either
            mgr.restore({"w": torch.zeros(3), "step": 0})
    assert _mgr(tmp_path / "empty").restore(_blank()) is None


def test_export_weights(tmp_path):
    from safetensors.torch import load_file
    model = torch.nn.Linear(4, 3)
    with _mgr(tmp_path) as mgr:
        mgr.save(7, {"model": model, "optim": {"m": torch.ones(5)}, "step": 7})
        info = mgr.export_weights(7, tmp_path / "w.safetensors", prefix="net.")
        assert info["tensors"] == 2
        got = load_file(str(tmp_path / "w.safetensors"))
        assert set(got) == {"net.weight", "net.bias"}
        assert torch.equal(got["net.weight"], model.weight.detach())
        mgr.export_weights(7, tmp_path / "all.pt", format="torch", key=None)
        assert set(torch.load(tmp_path / "all.pt")) == {"model.weight", "model.bias", "optim.m"}
        with pytest.raises(shardckpt.StateMismatchError):
            mgr.export_weights(7, tmp_path / "x.pt", key="nope")


def test_preemption_signal_saves_once_and_chains(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        mgr = _mgr(tmp_path, every_n_steps=100, handle_preemption=True,
                   preemption_signals=(signal.SIGUSR1,),
                   async_save=True, grace_seconds=60)
        assert not mgr.maybe_save(1, _state(1))
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # the repeat torchrun's agent sends
        assert mgr.maybe_save(2, _state(2)) and mgr.preempted
        assert mgr.steps() == [2]  # committed before maybe_save returned
        assert seen == [signal.SIGUSR1] * 2  # the program's own handler still ran
        assert not mgr.maybe_save(3, _state(3))
        mgr.close()
        assert signal.getsignal(signal.SIGUSR1) is not None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert len(seen) == 3  # our handler is gone, theirs is back
    finally:
        signal.signal(signal.SIGUSR1, previous)


_GRACE_CHILD = textwrap.dedent("""
    import os, signal, sys, time, torch, shardckpt
    mgr = shardckpt.CheckpointManager(sys.argv[1], async_save=False, grace_seconds=0.5)
    mgr.save(1, {"w": torch.ones(4)})
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # a loop stuck before its next maybe_save: the watchdog must end it
    print("not reached")
""")


def test_grace_period_expiry_exits_and_keeps_the_last_checkpoint(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _GRACE_CHILD, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == shardckpt.EXIT_GRACE_EXPIRED, proc.stderr
    assert "not reached" not in proc.stdout and "did not commit within 0.5 s" in proc.stderr
    assert time.monotonic() - t0 < 25
    state = {"w": torch.zeros(4)}
    assert _mgr(tmp_path).restore(state) == 1 and torch.equal(state["w"], torch.ones(4))


_ARMED_CHILD = textwrap.dedent("""
    import signal, time
    from shardckpt.manage.preemption import PreemptionWatcher
    watcher = PreemptionWatcher((signal.SIGUSR2,), grace_seconds=0.3)
    watcher.arm()  # the ranks agreed on a preemption another rank was signalled for
    time.sleep(30)
    print("not reached")
""")


def test_an_unsignalled_rank_also_keeps_the_grace_period():
    proc = subprocess.run([sys.executable, "-c", _ARMED_CHILD], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == shardckpt.EXIT_GRACE_EXPIRED, proc.stderr
    assert "not reached" not in proc.stdout


def test_save_options_reach_every_save(tmp_path):
    with _mgr(tmp_path, save_options={"codec": "zstd", "metadata": {"run": "a"},
                                      "overwrite": False}) as mgr:
        mgr.save(1, {"w": torch.zeros(4096)})
        mgr.save(1, {"w": torch.ones(4096)})  # the same step again: replaced
    from shardckpt.format.opening import open_for_read
    m, _ = open_for_read(tmp_path / step_name(1))
    assert m.metadata["run"] == "a" and m.metadata["shardckpt.manager"]["step"] == 1
    assert any(len(chain) for chain in m.codecs)  # zstd was used
    assert torch.equal(shardckpt.load_full(tmp_path / step_name(1))["w"], torch.ones(4096))


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="keep_best needs monitor"):
        _mgr(tmp_path, keep_best=1)
    with pytest.raises(ValueError, match="every_n_steps"):
        _mgr(tmp_path, every_n_steps=0)
    with pytest.raises(ValueError, match="mode"):
        _mgr(tmp_path, mode="best")


def test_on_an_object_store_without_rename():
    import uuid
    pytest.importorskip("fsspec")
    root = f"memory://manager-{uuid.uuid4().hex}"
    with _mgr(root, every_n_steps=1, keep_last=2, async_save=True) as mgr:
        for s in range(1, 5):
            mgr.maybe_save(s, _state(s), {"loss": float(s)})
        mgr.wait()
        assert mgr.steps() == [3, 4] and mgr.best_step() is None
        state = _blank()
        assert mgr.restore(state) == 4 and torch.equal(state["w"], _state(4)["w"])
    import fsspec
    fs = fsspec.filesystem("memory")
    assert fs.cat(f"{root}/latest").decode().strip() == step_name(4)


def test_cleanup_removes_old_leftovers_only(tmp_path):
    with _mgr(tmp_path) as mgr:
        mgr.save(1, _state(1))
        for name in (".step-00000002.tmp-ab12", "step-00000003"):  # interrupted saves
            (tmp_path / name / "data").mkdir(parents=True)
            then = time.time() - 7200
            os.utime(tmp_path / name / "data", (then, then))
            os.utime(tmp_path / name, (then, then))
        (tmp_path / ".step-00000004.tmp-cd34").mkdir()  # young: a save may be running
        removed = mgr.cleanup()
        assert sorted(r["name"] for r in removed) == [".step-00000002.tmp-ab12",
                                                     "step-00000003"]
        assert sorted(os.listdir(tmp_path)) == [".lease.json", ".manager-history.json",
                                                ".manager.json", ".step-00000004.tmp-cd34",
                                                "latest", "step-00000001"]
        assert mgr.steps() == [1]
