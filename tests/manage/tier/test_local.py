"""The local tier in one process: retention, restore preferring a newer local step, a full
local dir (DiskFullError, a warning, the durable tier goes on), and the CLI on a local dir."""

import json
import os
import threading

import pytest
import torch

import shardckpt
from shardckpt.cli import main
from shardckpt.testing.faults import tiny_filesystem


def manager(tmp_path, local, **kw):
    kw = {"every_n_steps": None, "local_every_n_steps": 1, "async_save": False,
          "handle_preemption": False, "local_on_busy": "wait", **kw}
    return shardckpt.CheckpointManager(tmp_path / "durable", local_dir=local, **kw)


def state(step: int) -> dict:
    return {"w": torch.arange(1000, dtype=torch.float32) + step, "step": step}


def test_keeps_local_keep_newest_and_restores_the_newest_tier(tmp_path):
    local = tmp_path / "local"
    with manager(tmp_path, local, every_n_steps=2, local_keep=2) as m:
        for step in range(1, 6):
            m.maybe_save(step, state(step))
    assert sorted(os.listdir(local)) == ["step-00000004", "step-00000005"]
    assert m.steps() == [2, 4]
    target = state(0)
    with manager(tmp_path, local) as m:
        assert m.restore(target) == 5  # the local step is newer than the durable 4
    assert target["step"] == 5 and torch.equal(target["w"], state(5)["w"])


def test_cli_works_on_a_local_dir(tmp_path, capsys):
    local = tmp_path / "local"
    with manager(tmp_path, local) as m:
        m.maybe_save(3, state(3))
    assert main(["ls", "--json", str(local)]) == 0
    assert "step-00000003" in capsys.readouterr().out
    assert main(["inspect", "--json", str(local / "step-00000003")]) == 0
    assert json.loads(capsys.readouterr().out)
    assert main(["verify", str(local / "step-00000003")]) == 0


def test_full_local_dir_warns_and_durable_goes_on(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    with tiny_filesystem(local, "4m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
        with manager(tmp_path, local, every_n_steps=1) as m:
            m.maybe_save(1, state(1))
            big = {"w": torch.randn(2 << 20), "step": 2}  # 8 MiB raw, twice the file system
            with pytest.warns(UserWarning, match="local save of step 2.*DiskFullError"):
                m.maybe_save(2, big)  # the background write fails: warned at the next call
                m.maybe_save(3, state(3))
            assert m.steps() == [1, 2, 3]  # the durable tier committed every step
        assert os.listdir(local) == ["step-00000003"]  # no debris, the old one intact
        shardckpt.verify(local / "step-00000003")


def test_promotion_copies_the_local_checkpoint(tmp_path):
    local = tmp_path / "local"
    with manager(tmp_path, local, every_n_steps=2, promote_local=True, async_save=True) as m:
        for step in range(1, 5):
            m.maybe_save(step, state(step))
    assert m.steps() == [2, 4]
    durable = tmp_path / "durable" / "step-00000004"
    assert (durable / "manifest.json").read_bytes() == \
        (local / "step-00000004" / "manifest.json").read_bytes()  # promoted, not re-staged
    shardckpt.verify(durable)
    target = state(0)
    shardckpt.load(target, durable)
    assert target["step"] == 4 and torch.equal(target["w"], state(4)["w"])


def test_a_local_save_in_flight_makes_the_next_one_skip(tmp_path, monkeypatch):
    """The default ``local_on_busy="skip"``: the caller never waits for a slow local write;
    the skipped step is counted and warned about, the saves in flight still commit."""
    from shardckpt.manage.tier import local as tiers
    release = threading.Event()
    original = tiers.LocalTier._write_and_replicate

    def slow(self, *args):
        release.wait(30)
        return original(self, *args)

    monkeypatch.setattr(tiers.LocalTier, "_write_and_replicate", slow)
    local = tmp_path / "local"
    with manager(tmp_path, local, local_on_busy="skip", local_keep=3) as m:
        first = state(1)
        m.maybe_save(1, first)
        first["w"].add_(100)  # changed after the call: the save holds the staged values
        with pytest.warns(UserWarning, match="local step 2 skipped.*step 1 is still running"):
            m.maybe_save(2, state(2))
        assert m._tier.skipped == 1
        release.set()
        assert m._tier.wait() is True
        m.maybe_save(3, state(3))
    assert sorted(os.listdir(local)) == ["step-00000001", "step-00000003"]
    target = state(0)
    shardckpt.load(target, local / "step-00000001")  # staged at the call: step 1's values
    assert torch.equal(target["w"], state(1)["w"])


def test_each_tier_has_its_own_rule_and_auto_interval(tmp_path):
    from shardckpt.policy import Auto, EveryNSteps
    now = [0.0]
    local = tmp_path / "local"
    with manager(tmp_path, local, local_every_n_steps=None, local_keep=50,
                 local_save=Auto(min_interval_s=2, max_interval_s=4, mtbf_prior_s=100.0),
                 save=EveryNSteps(5), clock=lambda: now[0]) as m:
        for step in range(1, 11):
            now[0] += 1.0
            m.maybe_save(step, state(step))
        local_auto = m._local.save.interval(m._local.facts)
    assert m.steps() == [5, 10]
    # The local tier's measured stall is tiny: its interval is the 2 s minimum.
    assert sorted(os.listdir(local)) == [f"step-{s:08d}" for s in (2, 4, 6, 8, 10)]
    assert local_auto == 2.0
    with pytest.raises(ValueError, match="not both"):
        manager(tmp_path / "x", local, local_save=EveryNSteps(2), local_every_n_steps=2)
