"""The CUDA staging path: pinned arena, side-stream copies, values at the call. Skips on CPU."""

import pytest
import torch

import shardckpt
from shardckpt.save import stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_tensors_async_save_the_values_at_the_call(tmp_path):
    state = {"w": torch.randn(4096, 1024, device="cuda"), "b": torch.arange(1000, device="cuda")}
    expected = {k: v.cpu() for k, v in state.items()}
    handle = shardckpt.async_save(state, tmp_path / "c")
    state["w"].mul_(2)  # queued on the training's stream right after the call
    handle.result(timeout=120)
    loaded = shardckpt.load_full(tmp_path / "c")
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert stage.ARENA.buffer.is_pinned()


def test_streaming_through_a_small_budget_from_the_device(tmp_path):
    state = {"w": torch.randn(8 << 20, device="cuda")}  # 32 MiB through 4 MiB
    expected = state["w"].cpu()
    shardckpt.async_save(state, tmp_path / "c", staging_budget_bytes=4 << 20).result(timeout=120)
    assert torch.equal(shardckpt.load_full(tmp_path / "c")["w"], expected)


def test_load_into_cuda_tensors(tmp_path):
    src = {"w": torch.randn(256, 256)}
    shardckpt.save(src, tmp_path / "c")
    target = {"w": torch.zeros(256, 256, device="cuda")}
    shardckpt.load(target, tmp_path / "c")
    assert torch.equal(target["w"].cpu(), src["w"])


def _cuda_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train(model, opt):
    opt.zero_grad()
    model(torch.randn(64, 1024, device="cuda")).square().mean().backward()
    opt.step()


def test_guarded_device_tensors_are_copied_behind_the_next_step(tmp_path, faults):
    model, opt = _cuda_model()
    _train(model, opt)
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    release = tmp_path / "release"
    faults.stall_in_write(release)  # streaming through 1 MiB: the copier is held mid-way
    handle = shardckpt.async_save({"model": model, "optim": opt}, tmp_path / "c",
                                  staging_budget_bytes=1 << 20)
    assert not handle.staged()  # the caller did not wait for the device copies
    model(torch.randn(64, 1024, device="cuda")).square().mean().backward()  # overlaps
    open(release, "w").close()
    opt.step()  # its pre-hook waits for the copies
    handle.result(timeout=120)
    loaded = shardckpt.load_full(tmp_path / "c")["model"]
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_guarded_device_tensor_changed_outside_the_step_fails_the_save(tmp_path, faults):
    model, opt = _cuda_model()
    _train(model, opt)
    release = tmp_path / "release"
    faults.stall_in_write(release)
    handle = shardckpt.async_save({"model": model, "optim": opt}, tmp_path / "c",
                                  staging_budget_bytes=1 << 20)
    with torch.no_grad():
        model[1].weight.mul_(2)  # queued on the training's stream, not copied yet
    open(release, "w").close()
    with pytest.raises(shardckpt.StateChangedError, match="model/1.weight"):
        handle.result(timeout=120)
    assert not (tmp_path / "c").exists()
