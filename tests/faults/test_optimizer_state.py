"""Case 14 (issue 25): loading a checkpoint saved before an optimizer's first step into an
optimizer that has stepped must leave exactly the checkpoint's state, as
``torch.optim.Optimizer.load_state_dict`` does (it replaces the state whole), with strict and
with strict=False."""

import copy

import pytest
import torch

import shardckpt

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))


def _step(model, opt, n=2):
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_a_checkpoint_before_the_first_step_replaces_a_stepped_state(tmp_path, kind, strict):
    model = _model()
    opt = OPTIMIZERS[kind](model.parameters())
    saved_sd = copy.deepcopy(opt.state_dict())  # before the first step: no state
    shardckpt.save({"optim": opt}, tmp_path / "c")
    _step(model, opt)
    assert opt.state  # the moments exist now

    reference = OPTIMIZERS[kind](_model().parameters())
    reference.load_state_dict(saved_sd)  # what torch.optim gives

    shardckpt.load({"optim": opt}, tmp_path / "c", strict=strict)
    assert not opt.state
    assert _same(opt.state_dict(), reference.state_dict())


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_a_later_checkpoint_replaces_the_state_of_an_earlier_one(tmp_path, kind, strict):
    model = _model()
    opt = OPTIMIZERS[kind](model.parameters())
    _step(model, opt)
    saved_sd = copy.deepcopy(opt.state_dict())
    shardckpt.save({"optim": opt}, tmp_path / "c")
    _step(model, opt, 3)

    shardckpt.load({"optim": opt}, tmp_path / "c", strict=strict)
    reference = OPTIMIZERS[kind](_model().parameters())
    reference.load_state_dict(saved_sd)
    assert _same(opt.state_dict(), reference.state_dict())


def test_a_fresh_optimizer_takes_a_stepped_checkpoint(tmp_path):
    model = _model()
    opt = OPTIMIZERS["adam"](model.parameters())
    _step(model, opt)
    shardckpt.save({"optim": opt}, tmp_path / "c")
    fresh = OPTIMIZERS["adam"](_model().parameters())
    shardckpt.load({"optim": fresh}, tmp_path / "c")
    assert _same(fresh.state_dict(), opt.state_dict())
