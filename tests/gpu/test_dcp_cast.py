"""DCP loads into CUDA tensors of another dtype: decoded on the host in the saved dtype, then
copied and cast into the device tensor, leaving its neighbours alone. Skips on CPU."""

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import shardckpt
from shardckpt.integrations.dcp import Reader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.int32])
def test_dcp_load_into_a_cuda_slice_of_another_dtype(tmp_path, dtype):
    n, pad = 1 << 20, 64
    saved = torch.arange(n, dtype=torch.float32) % 251
    shardckpt.save({"w": saved}, tmp_path / "c")
    outer = torch.full((n + 2 * pad,), 7, dtype=dtype, device="cuda")
    target = outer[pad:pad + n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"w": target}, storage_reader=Reader(str(tmp_path / "c")))
    assert torch.equal(target.cpu(), saved.to(dtype))
    assert (outer[:pad] == 7).all() and (outer[-pad:] == 7).all()
