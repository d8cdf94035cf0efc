"""Shared test helpers: bit-exact comparison of nested states, and sample states."""

from __future__ import annotations

import torch

from shardckpt.types import DTYPES


def assert_same(a, b, path="<root>"):
    """Bit-exact equality of nested states (tensors compared by dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        x, y = a.detach().cpu().resolve_conj().resolve_neg(), b.detach().cpu()
        assert torch.equal(x.contiguous().reshape(-1).view(torch.uint8),
                           y.contiguous().reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, path
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def random_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """A tensor of dtype ``name`` with varied values (every bit pattern kind the dtype allows)."""
    dt = DTYPES[name].torch
    if dt == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dt.is_complex:
        return torch.randn(shape, generator=gen, dtype=dt)
    if dt.is_floating_point:
        return (torch.randn(shape, generator=gen) * 3).to(dt)
    return torch.randint(-2**62, 2**62, shape, generator=gen, dtype=torch.int64).to(dt)


def all_dtype_state(gen: torch.Generator) -> dict:
    """One tensor of every format dtype, in assorted shapes."""
    shapes = [(3, 5), (17,), (2, 3, 4), (), (0, 4)]
    return {name: random_tensor(name, shapes[i % len(shapes)], gen)
            for i, name in enumerate(DTYPES)}


def trials(ci: int, soak: int) -> int:
    """How many trials a sampled fault test runs: ``ci`` normally, ``soak`` with
    SHARDCKPT_SLOW=1 (which also runs the tests marked ``slow``)."""
    import os
    return soak if os.environ.get("SHARDCKPT_SLOW") == "1" else ci
