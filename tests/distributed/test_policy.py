"""Policies on 2 gloo ranks with FSDP2 + AdamW: every rank takes the same decisions (epochs,
rank 0's metric, demotion on rank 0 only), a SIGTERM on one rank mid-run saves on both and
stops, and the restart resumes from the newest full checkpoint with its epoch."""

import os
import signal

import torch

import shardckpt
from shardckpt.policy import EveryNEpochs, KeepFull, KeepLast, OnImprovement
from shardckpt.testing import run_with_ranks


def _model():
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _states(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def _step(model, opt, gen):
    model(torch.randn(4, 8, generator=gen)).square().mean().backward()
    opt.step()
    opt.zero_grad()


# Rank 0's validation losses per epoch; rank 1 reports other numbers (rank 0's decide).
LOSSES = [3.0, 2.0, 2.5, 1.5, 1.6, 1.7]


def _train(rank, world, root, kill_at):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mgr = shardckpt.CheckpointManager(
        root, save=EveryNEpochs(1) & OnImprovement("val_loss"), keep=KeepLast(3),
        demote=KeepFull(last=1), preemption_signals=(signal.SIGTERM,), grace_seconds=60)
    gen = torch.Generator().manual_seed(rank)
    _step(model, opt, gen)  # AdamW has state to restore into only after a step
    state = _states(model, opt)
    restored = mgr.restore(state)
    if restored is not None:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    start_epoch = restored.epoch if restored is not None else 0
    saved, step = [], (int(restored) if restored is not None else 0)
    for epoch in range(start_epoch, len(LOSSES)):
        for _ in range(2):
            step += 1
            _step(model, opt, gen)
            if rank == 1 and step == kill_at:
                os.kill(os.getpid(), signal.SIGTERM)
            if mgr.maybe_save(step, _states(model, opt), epoch=epoch):
                saved.append(("step", step))
            if mgr.preempted:
                break
        if mgr.preempted:
            break
        loss = LOSSES[epoch] if rank == 0 else 100.0 - epoch
        if mgr.maybe_save(step, _states(model, opt), {"val_loss": loss}, epoch=epoch + 1):
            saved.append(("epoch", epoch + 1))
    mgr.close()
    kinds = {r["step"]: (r["epoch"], r["kind"], r["reason"]) for r in mgr.history()
             if r["state"] != "removed"}
    return saved, mgr.preempted, (None if restored is None else (int(restored),
                                                                  restored.epoch)), kinds


def test_policies_agree_on_two_ranks_through_a_sigterm(tmp_path):
    root = str(tmp_path)
    first = run_with_ranks(2, _train, root, 7, timeout=120)
    a, b = first[0].value, first[1].value
    assert a[:3] == b[:3]
    # Epochs 1, 2 improve (3.0, 2.0), epoch 3 does not (2.5); SIGTERM on rank 1 at step 7
    # is acted on one call later by both ranks: a preemption save at step 8.
    assert a[0] == [("epoch", 1), ("epoch", 2), ("step", 8)] and a[1] is True
    kinds = a[3]
    assert kinds[8][1:] == ("full", "preemption") and kinds[8][0] == 3
    assert {s: k[1] for s, k in kinds.items()} == {2: "weights", 4: "weights", 8: "full"}
    second = run_with_ranks(2, _train, root, -1, timeout=120)
    a2, b2 = second[0].value, second[1].value
    assert a2[2] == b2[2] == (8, 3)  # resumed from the full preemption checkpoint, epoch 3
    # Epoch 4 (1.5) beats 2.0, epochs 5 and 6 do not.
    assert a2[0] == b2[0] == [("epoch", 4)]
    full = shardckpt.load_full(tmp_path / "step-00000004")
    assert set(full) == {"model"}


def _save_sharded(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    full = {"w": torch.randn(64, 32, generator=g), "m": torch.randn(64, 32, generator=g)}
    state = {"model": {"w": distribute_tensor(full["w"], mesh, [Shard(0)])},
             "optim": {"m": distribute_tensor(full["m"], mesh, [Shard(0)])}}
    shardckpt.save(state, f"{root}/step-00000001", timeout=60)
    return full


def test_demoting_a_two_rank_indexed_checkpoint_keeps_its_weights_bit_exact(tmp_path):
    from shardckpt.format.demote import demote
    from shardckpt.storage import open_storage
    full = run_with_ranks(2, _save_sharded, str(tmp_path), timeout=90)[0].value
    data = tmp_path / "step-00000001" / "data"
    assert any(p.suffix == ".idx" for p in data.iterdir())  # revision 1.4: chunk index files
    before = sum(p.stat().st_size for p in data.iterdir())
    assert demote(open_storage(str(tmp_path)), "step-00000001")["demoted"]
    got = shardckpt.load_full(tmp_path / "step-00000001")
    assert set(got) == {"model"} and torch.equal(got["model"]["w"], full["w"])
    shardckpt.verify(tmp_path / "step-00000001")
    after = sorted(p.name for p in data.iterdir())
    assert all(n.startswith("weights-") for n in after)  # data and index files gone
    assert sum(p.stat().st_size for p in data.iterdir()) < 0.6 * before
