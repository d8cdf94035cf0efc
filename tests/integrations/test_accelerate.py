"""Accelerate save_state / load_state content through shardckpt: a bit-exact round trip of
models, optimizers, schedulers, RNG, registered objects and loader positions, on 1 and 2
processes."""

import importlib.util
import random

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                reason="needs shardckpt[accelerate]")


class Counter:
    """A registered custom object."""

    def __init__(self):
        self.seen, self.history = 0, []

    def state_dict(self):
        return {"seen": self.seen, "history": list(self.history)}

    def load_state_dict(self, state):
        self.seen, self.history = state["seen"], list(state["history"])


def _setup():
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    data = torch.utils.data.TensorDataset(torch.randn(32, 5), torch.randn(32, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    counter = Counter()
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, opt, sched, loader, counter


def _train(accelerator, model, opt, sched, loader, counter, steps):
    for _, (x, y) in zip(range(steps), loader):
        loss = torch.nn.functional.mse_loss(model(x + torch.randn_like(x) * 0.01), y)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        counter.seen += 1
        counter.history.append(round(loss.item(), 6))


def _snapshot(model, opt, sched, loader, counter):
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": {k: {n: t.clone() for n, t in s.items()}
                    for k, s in opt.state_dict()["state"].items()},
            "lr": sched.state_dict(), "counter": counter.state_dict(),
            "iteration": loader.iteration}


def _draws():
    return (torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist())


def _round_trip(rank, world, path):
    from shardckpt.integrations.accelerate import load_state, save_state
    objs = _setup()
    accelerator = objs[0]
    _train(*objs, steps=5)
    for _ in range(1):
        list(objs[4])  # a whole epoch: the loader's epoch counter moves
    save_state(accelerator, path, timeout=60)
    before, draws = _snapshot(*objs[1:]), _draws()
    _train(*objs, steps=3)  # moves every piece of state away from the checkpoint
    objs[4].iteration += 2
    load_state(accelerator, path, timeout=60)
    after, again = _snapshot(*objs[1:]), _draws()
    return before, after, draws, again


def _assert_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    else:
        assert a == b


def test_round_trip_is_bit_exact_on_one_process(tmp_path):
    before, after, draws, again = _round_trip(0, 1, str(tmp_path / "ck"))
    _assert_equal(before, after)
    assert draws == again  # the RNG streams continue exactly where they were saved
    assert before["counter"]["seen"] == 5 and before["iteration"] >= 1


def test_round_trip_is_bit_exact_on_two_processes(tmp_path):
    import shardckpt
    from shardckpt.testing import run_with_ranks

    results = [r.value for r in run_with_ranks(2, _two, str(tmp_path / "ck"), timeout=240)]
    for before, after, draws, again in results:
        _assert_equal(before, after)
        assert draws == again
    assert results[0][2] != results[1][2]  # per-process RNG states, each restored as its own
    m = shardckpt.load_full(tmp_path / "ck")  # the weights were saved once, as one replica
    assert torch.equal(m["models"][0]["0.weight"], results[0][0]["model"]["module.0.weight"])


def _two(rank, world, path):
    import os
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    return _round_trip(rank, world, path)


def test_enabled_accelerator_names_keeps_and_finds_checkpoints_like_accelerate(tmp_path):
    import os

    import shardckpt
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from shardckpt.errors import CheckpointExistsError
    from shardckpt.integrations.accelerate import enable

    old = tmp_path / "checkpoints" / "checkpoint_0"  # Accelerate's format, before the switch
    old.mkdir(parents=True)
    (old / "optimizer.bin").write_bytes(b"pickle")
    config = ProjectConfiguration(project_dir=str(tmp_path), automatic_checkpoint_naming=True,
                                  total_limit=2, iteration=1)
    accelerator = enable(Accelerator(cpu=True, project_config=config))
    model = accelerator.prepare(torch.nn.Linear(3, 1))
    for step in range(1, 4):
        with torch.no_grad():
            model.weight.fill_(step)
        accelerator.save_state()  # the user's own call, no path: Accelerate's folder naming
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["checkpoint_2", "checkpoint_3"]  # total_limit=2
    assert accelerator.project_configuration.iteration == 4
    assert shardckpt.verify(root / "checkpoint_3").ok

    with torch.no_grad():
        model.weight.fill_(-1)
    accelerator.load_state()  # the newest: checkpoint_3
    assert torch.equal(model.weight, torch.full((1, 3), 3.0))
    accelerator.load_state(root / "checkpoint_2", map_location="cpu")
    assert torch.equal(model.weight, torch.full((1, 3), 2.0))
    with pytest.raises(TypeError, match="Unsupported optimizer map location"):
        accelerator.load_state(root / "checkpoint_2", map_location="invalid")

    accelerator.project_configuration.iteration = 3  # a resumed run that reuses a number
    with pytest.raises(CheckpointExistsError, match="checkpoint_3.*already exists"):
        accelerator.save_state()
    accelerator.project_configuration.automatic_checkpoint_naming = False
    explicit = tmp_path / "explicit"
    assert accelerator.save_state(explicit) == str(explicit)  # a given folder, as Accelerate
    assert accelerator.save_state(explicit) == str(explicit)  # and replaced like Accelerate


def test_enabled_accelerator_calls_the_model_state_hooks(tmp_path):
    import os

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from shardckpt.integrations.accelerate import enable

    calls = []

    def save_hook(models, weights, folder):  # e.g. a diffusers-style extra file
        calls.append(("save", len(weights), os.path.basename(folder)))
        with open(os.path.join(folder, "extra.txt"), "w") as fh:
            fh.write("mine")

    config = ProjectConfiguration(project_dir=str(tmp_path), automatic_checkpoint_naming=True,
                                  total_limit=1)
    accelerator = enable(Accelerator(cpu=True, project_config=config))
    accelerator.prepare(torch.nn.Linear(2, 1))
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(
        lambda models, folder: calls.append(("load", len(models), os.path.basename(folder))))
    accelerator.save_state()
    accelerator.save_state()  # total_limit=1 deletes checkpoint_0, its extra file included
    accelerator.load_state()
    assert calls == [("save", 1, "checkpoint_0"), ("save", 1, "checkpoint_1"),
                     ("load", 1, "checkpoint_1")]
    assert os.listdir(tmp_path / "checkpoints") == ["checkpoint_1"]
    assert (tmp_path / "checkpoints" / "checkpoint_1" / "extra.txt").read_text() == "mine"


def _enabled_saves(rank, world, root):
    import os
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from shardckpt.integrations.accelerate import enable
    config = ProjectConfiguration(project_dir=root, automatic_checkpoint_naming=True,
                                  total_limit=2)
    accelerator = enable(Accelerator(cpu=True, project_config=config))
    model = accelerator.prepare(torch.nn.Linear(3, 1))
    for step in range(4):
        with torch.no_grad():
            model.module.weight.fill_(step)
        accelerator.save_state()
    with torch.no_grad():
        model.module.weight.fill_(-1)
    accelerator.load_state()
    return sorted(os.listdir(os.path.join(root, "checkpoints"))), model.module.weight.tolist()


def test_enabled_accelerator_on_two_processes(tmp_path):
    from shardckpt.testing import run_with_ranks
    results = [r.value for r in run_with_ranks(2, _enabled_saves, str(tmp_path), timeout=240)]
    for names, weight in results:
        assert names == ["checkpoint_2", "checkpoint_3"] and weight == [[3.0, 3.0, 3.0]]
