"""Real training states: FSDP2 (fully_shard) + AdamW through get/set_state_dict, and DDP."""

import pytest
import torch

import shardckpt
from shardckpt.testing import run_with_ranks
from tests.helpers import assert_same


def _model():
    torch.manual_seed(0)  # the same initial weights on every rank and in every world size
    return torch.nn.Sequential(torch.nn.Linear(8, 15), torch.nn.ReLU(), torch.nn.Linear(15, 7),
                               torch.nn.LayerNorm(7))


def _fsdp(model):
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(layer)
    return fully_shard(model)


def _full(sd):
    """A state dict with every DTensor gathered whole (a collective)."""
    if isinstance(sd, dict):
        return {k: _full(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_full(v) for v in sd]
    return sd.full_tensor() if hasattr(sd, "full_tensor") else sd


def _train_fsdp_and_save(rank, world, path):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model = _fsdp(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(3):
        model(torch.randn(4, 8, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    shardckpt.save({"model": msd, "optim": osd}, path, timeout=60)
    return _full({"model": msd, "optim": osd["state"]})


def _load_fsdp(rank, world, paths):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    out = {}
    for name, path in paths.items():
        model = _fsdp(_model())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        msd, osd = get_state_dict(model, opt)
        shardckpt.load({"model": msd, "optim": osd}, path, timeout=60)
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        msd, osd = get_state_dict(model, opt)
        out[name] = _full({"model": msd, "optim": osd["state"]})
    return out


@pytest.fixture(scope="module")
def fsdp_saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    saved = {}
    for n in (2, 3):
        path = str(root / f"world{n}")
        saved[n] = (path, run_with_ranks(n, _train_fsdp_and_save, path)[0].value)
    return saved


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp2_model_and_adamw_reshard(world, fsdp_saved):
    paths = {n: path for n, (path, _) in fsdp_saved.items()}
    for result in run_with_ranks(world, _load_fsdp, paths):
        for n, (_, expected) in fsdp_saved.items():
            assert_same(expected, result.value[n])


def _train_ddp_and_save(rank, world, path, load_only):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if not load_only:
        gen = torch.Generator().manual_seed(rank)
        for _ in range(2):
            model(torch.randn(4, 8, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        shardckpt.save({"model": model, "optim": opt}, path, timeout=60)
    else:
        shardckpt.load({"model": model, "optim": opt}, path, timeout=60)
    return {"model": model.state_dict(), "optim": opt.state_dict()["state"]}


def test_ddp_saves_one_copy_and_loads_on_another_world(tmp_path):
    path = str(tmp_path / "ddp")
    saved = run_with_ranks(2, _train_ddp_and_save, path, False)
    assert_same(saved[0].value, saved[1].value)  # DDP keeps the replicas identical
    manifest = shardckpt.format.opening.open_manifest(*shardckpt.storage.open_checkpoint(path))
    assert all(len(t.shards) == 1 for t in manifest.tensors.values())
    for r in run_with_ranks(3, _train_ddp_and_save, path, True):
        assert_same(saved[0].value, r.value)
