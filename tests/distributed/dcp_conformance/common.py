"""What the conformance modules share: small models, and DCP save/load through shardckpt's
adapters with the same signature everywhere."""

from __future__ import annotations

import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from shardckpt.integrations.dcp import Reader, Writer


def save(state, path, **writer_options):
    """``dcp.save`` into a shardckpt checkpoint at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns when it runs without a process group
        return dcp.save(state, storage_writer=Writer(str(path), **writer_options))


def load(state, path, **kwargs):
    """``dcp.load`` from the shardckpt checkpoint at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcp.load(state, storage_reader=Reader(str(path)), **kwargs)


class LinearStack(nn.Module):
    """Four linear layers (upstream's TestDummyModel / SimpleModelUneven shape)."""

    def __init__(self, sizes=(8, 16, 32, 64, 8), seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class MixedModule(nn.Module):
    """Linear layers and an embedding bag (upstream's MyTestModule)."""

    def __init__(self):
        super().__init__()
        self.linear_1 = nn.Linear(5, 5)
        self.linear_2 = nn.Linear(5, 1)
        self.emb = nn.EmbeddingBag(5, 10)


def assert_tensors_equal(a: dict, b: dict) -> None:
    """Same keys, and bit-equal tensors under each."""
    assert set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
