"""Guarded async_save of FSDP2 states on 2 gloo ranks: lazy copies of the DTensor shards that
``get_state_dict`` returns, a step right after the call, and a torn-state failure on every rank."""

import os

import pytest
import torch

import shardckpt
from shardckpt.testing import Faults, run_with_ranks
from tests.distributed.test_models import _full
from tests.helpers import assert_same


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 2048))  # 1 MiB shards of the last weight
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _cloned(sd):
    """Copies of every tensor (``_full`` returns plain tensors, such as ``step``, as they are)."""
    if isinstance(sd, dict):
        return {k: _cloned(v) for k, v in sd.items()}
    return sd.clone() if isinstance(sd, torch.Tensor) else sd


def _train(model, opt, gen):
    model(torch.randn(8, 64, generator=gen)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _save_twice_stepping_at_once(rank, world, root):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model = _fsdp_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(rank)
    _train(model, opt, gen)
    out = []
    for k in range(2):
        msd, osd = get_state_dict(model, opt)
        expected = _cloned(_full({"model": msd, "optim": osd["state"]}))
        handle = shardckpt.async_save({"model": msd, "optim": osd}, f"{root}/c{k}", guard=opt,
                                      staging_budget_bytes=1 << 20, chunk_bytes=4096,
                                      timeout=60)
        lazy = len(handle._watch.tensors) if handle._watch is not None else 0
        _train(model, opt, gen)  # the step waits for this rank's lazy copies
        handle.result(timeout=60)
        out.append((expected, lazy))
    return out


def test_fsdp2_guarded_saves_hold_the_values_at_the_call(tmp_path):
    results = run_with_ranks(2, _save_twice_stepping_at_once, str(tmp_path))
    for k, (expected, _) in enumerate(results[0].value):
        loaded = shardckpt.load_full(tmp_path / f"c{k}")
        assert_same(expected, {"model": loaded["model"], "optim": loaded["optim"]["state"]})
    # Every rank's weight shards and their 2 moments each were copied lazily (6 tensors); the
    # bias shards (under two pages, too small to watch for writes) are copied at the call.
    for r in results:
        assert all(lazy == 6 for _, lazy in r.value), r.value


def _change_a_shard_during_the_copy(rank, world, root):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model = _fsdp_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, torch.Generator().manual_seed(rank))
    msd, osd = get_state_dict(model, opt)
    release = f"{root}/release{rank}"
    faults = Faults(pytest.MonkeyPatch())
    if rank == 1:
        faults.stall_in_write(release)
    handle = shardckpt.async_save({"model": msd, "optim": osd}, f"{root}/ckpt", guard=opt,
                                  staging_budget_bytes=1 << 20, chunk_bytes=4096, timeout=60)
    if rank == 1:
        with torch.no_grad():
            model[2].weight.to_local().mul_(2)  # this rank's last layer: not copied yet
        open(release, "w").close()
    try:
        handle.result(timeout=60)
        return "ok"
    except shardckpt.RankFailureError as exc:
        return {r: type(e).__name__ if isinstance(e, Exception) else str(e)[:200]
                for r, e in exc.failures.items()}


def test_a_changed_shard_fails_the_save_on_every_rank(tmp_path):
    results = [r.value for r in run_with_ranks(2, _change_a_shard_during_the_copy,
                                               str(tmp_path))]
    assert all(isinstance(v, dict) and 1 in v for v in results), results
    assert results[1][1] == "StateChangedError"
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.load_full(tmp_path / "ckpt")
    assert not [n for n in os.listdir(tmp_path) if not n.startswith("release")]
