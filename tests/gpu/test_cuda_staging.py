"""The CUDA staging path: pinned arena, side-stream copies, values at the call. Skips on CPU."""

import pytest
import torch

import shardckpt
from shardckpt import stage

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
