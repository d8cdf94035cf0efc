"""Decoding into a caller's tensor (read.ReadPlan, and the DCP Reader on top of it) writes the
saved values, cast to the target's dtype, into exactly the target's elements and nowhere else.

The targets live inside larger canary-filled buffers, so a decode that ran past the target (the
raw bytes of a wider dtype decoded in place) or into the gaps of a strided view shows up as a
changed canary.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings, strategies as st

import shardckpt
from shardckpt import codecs
from shardckpt.codecs import reference
from shardckpt.integrations.dcp import Reader
from shardckpt.errors import CorruptCheckpointError, StateMismatchError
from shardckpt.load.read import ReadPlan, backend_request
from shardckpt.format.opening import open_for_read

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
          torch.int64, torch.uint8, torch.bool]
SHAPES = {"vec": (37,), "mat": (6, 10), "cube": (3, 4, 5)}
PAD = 24
CANARY = 7  # representable exactly in every dtype above (True for bool)


def _values(dtype, shape) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    base = torch.arange(n, dtype=torch.float64).reshape(shape) * 0.75 % 97  # small, >= 0
    return (base > 3) if dtype == torch.bool else base.to(dtype)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint per stored dtype, with small chunks so reads straddle chunk ends."""
    root = tmp_path_factory.mktemp("dtypes")
    out = {}
    for dt in DTYPES:
        path = str(root / str(dt).removeprefix("torch."))
        shardckpt.save({k: _values(dt, s) for k, s in SHAPES.items()}, path, chunk_bytes=48)
        out[dt] = path
    return out


def _target(dtype, shape, layout):
    """``(target, outer, untouched)``: a target view of ``outer`` and a mask of the elements of
    ``outer`` the load must leave alone."""
    n = 1
    for d in shape:
        n *= d
    if layout == "contiguous":
        outer = torch.full((n + 2 * PAD,), CANARY, dtype=dtype)
        target = outer[PAD:PAD + n].view(shape)
    elif layout == "strided":  # every other element of a larger buffer
        outer = torch.full((2 * n + 2 * PAD,), CANARY, dtype=dtype)
        target = outer[PAD:PAD + 2 * n:2].view(shape) if n else outer[:0].view(shape)
    else:  # "transposed": a permuted view of a contiguous block
        outer = torch.full((n + 2 * PAD,), CANARY, dtype=dtype)
        target = outer[PAD:PAD + n].view(tuple(reversed(shape))).permute(
            *reversed(range(len(shape))))
    mask = torch.ones(outer.shape, dtype=torch.bool)
    probe = torch.zeros(outer.shape, dtype=torch.int8)
    probe.as_strided(target.shape, target.stride(), target.storage_offset()).fill_(1)
    mask &= probe == 0
    return target, outer, mask


def _check(target, outer, untouched, want):
    assert torch.equal(target, want), (target, want)
    canary = torch.tensor(CANARY, dtype=outer.dtype)
    assert (outer[untouched] == canary).all(), "memory around the target was written"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stored=st.sampled_from(DTYPES), dtype=st.sampled_from(DTYPES),
       name=st.sampled_from(sorted(SHAPES)), layout=st.sampled_from(
           ["contiguous", "strided", "transposed"]), via_dcp=st.booleans())
def test_load_into_any_dtype_and_layout_casts_and_stays_inside(saved, stored, dtype, name,
                                                               layout, via_dcp):
    shape = SHAPES[name]
    target, outer, untouched = _target(dtype, shape, layout)
    if via_dcp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns that no process group exists
            dcp.load({name: target}, storage_reader=Reader(saved[stored]))
    else:
        m, paths = open_for_read(saved[stored])
        plan = ReadPlan(m)
        plan.into(name, target)
        plan.run(paths)
    _check(target, outer, untouched, _values(stored, shape).to(dtype))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stored=st.sampled_from(DTYPES), dtype=st.sampled_from(DTYPES),
       data=st.data())
def test_resharding_decode_of_a_box_casts_and_stays_inside(saved, stored, dtype, data):
    """A box of the global tensor (the resharding path: a run of whole chunks decoded in place
    plus straddling chunks through buffers, or a shard buffer then a copy)."""
    shape = SHAPES["mat"]
    lo = [data.draw(st.integers(0, n - 1)) for n in shape]
    box = tuple(data.draw(st.integers(1, n - o)) for n, o in zip(shape, lo))
    target, outer, untouched = _target(dtype, box, "contiguous")
    m, paths = open_for_read(saved[stored])
    plan = ReadPlan(m)
    plan.into("mat", target, tuple(lo))
    plan.run(paths)
    full = _values(stored, shape)
    want = full[tuple(slice(o, o + n) for o, n in zip(lo, box))].to(dtype)
    _check(target, outer, untouched, want)


def test_dcp_load_of_fp32_into_a_large_bf16_tensor_is_cast(tmp_path):
    """The report's case: 1M fp32 elements into bf16 wrote past the target."""
    n = 1 << 20
    path = str(tmp_path / "big")
    shardckpt.save({"w": torch.arange(n, dtype=torch.float32) % 251}, path)
    outer = torch.full((n + 2 * PAD,), CANARY, dtype=torch.bfloat16)
    target = outer[PAD:PAD + n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"w": target}, storage_reader=Reader(path))
    assert torch.equal(target, (torch.arange(n, dtype=torch.float32) % 251).to(torch.bfloat16))
    assert (outer[:PAD] == CANARY).all() and (outer[-PAD:] == CANARY).all()


def test_shardckpt_load_refuses_another_dtype_untouched(saved):
    target = torch.full(SHAPES["vec"], CANARY, dtype=torch.float16)
    with pytest.raises(StateMismatchError, match="dtype"):
        shardckpt.load({"vec": target, "mat": torch.zeros(6, 10), "cube": torch.zeros(3, 4, 5)},
                       saved[torch.float32])
    assert (target == CANARY).all()


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_backend_refuses_a_destination_of_another_size(saved, backend):
    """Defence in depth: a read whose destination does not hold what the chunk decodes to is
    refused before anything is written, whatever planned it."""
    if backend == "native" and codecs.BACKEND != "native":
        pytest.skip("native module not built")
    impl = codecs.backend if backend == "native" else reference
    m, paths = open_for_read(saved[torch.float32])
    plan = ReadPlan(m)
    target = torch.zeros(SHAPES["vec"])
    plan.into("vec", target)
    file, reads = sorted(plan.by_file.items())[0]
    requests = [backend_request(r) for r in reads]
    good = impl.read_chunks(paths[file], requests, 1)
    assert good[0] == 0, good
    short = list(requests[-1])
    short[7] -= 2  # as if the destination were two bytes short
    target.fill_(CANARY)
    code, message, chunk, _ = impl.read_chunks(paths[file], requests[:-1] + [tuple(short)], 1)
    assert code == 1 and chunk == len(requests) - 1 and "destination holds" in message
    assert (target == CANARY).all()  # refused before any chunk was decoded


def test_backend_status_becomes_a_typed_error(saved, monkeypatch):
    m, paths = open_for_read(saved[torch.float32])
    plan = ReadPlan(m)
    plan.into("vec", torch.zeros(SHAPES["vec"]))
    for reads in plan.by_file.values():
        reads[0] = dataclasses.replace(reads[0], dest_bytes=1)
    with pytest.raises(CorruptCheckpointError, match="destination holds 1 bytes"):
        plan.run(paths)


def test_remote_reads_cast_into_another_dtype_too():
    """Object stores decode fetched ranges through the same plan (load/fetch.py)."""
    import uuid
    path = f"memory://shardckpt-test-{uuid.uuid4().hex}/c"
    shardckpt.save({"w": _values(torch.float32, (6, 10))}, path, chunk_bytes=48)
    target, outer, untouched = _target(torch.bfloat16, (6, 10), "strided")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"w": target}, storage_reader=Reader(path))
    _check(target, outer, untouched, _values(torch.float32, (6, 10)).to(torch.bfloat16))
