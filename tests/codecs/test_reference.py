"""The native core and the pure-Python reference codec read and write the same format."""

import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import shardckpt
from shardckpt import _native, codecs
from shardckpt.codecs import reference
from tests.helpers import assert_same, random_tensor
from shardckpt.types import DTYPES


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_shuffle_matches(k):
    data = np.random.default_rng(k).integers(0, 256, 4096 * k + 0, dtype=np.uint8).tobytes()
    assert _native.shuffle(data, k) == reference.shuffle(data, k)
    assert _native.unshuffle(_native.shuffle(data, k), k) == data


def test_crc32c_matches_on_many_lengths():
    rng = np.random.default_rng(0)
    for n in list(range(70)) + [1000, 4096, 65537]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _native.crc32c(data) == reference.crc32c(data)


def _save_with(backend_name, state, path, **kw):
    if backend_name == "reference":
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(codecs, "backend", reference)
            return shardckpt.save(state, path, **kw)
    return shardckpt.save(state, path, **kw)


def _load_with(backend_name, path):
    if backend_name == "reference":
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(codecs, "backend", reference)
            return shardckpt.load_full(path)
    return shardckpt.load_full(path)


states = st.builds(
    lambda names, shapes, seed: {
        f"t{i}": random_tensor(n, s, torch.Generator().manual_seed(seed + i))
        for i, (n, s) in enumerate(zip(names, shapes))},
    st.lists(st.sampled_from(sorted(DTYPES)), min_size=1, max_size=4),
    st.lists(st.lists(st.integers(0, 40), max_size=3).map(tuple), min_size=4, max_size=4),
    st.integers(0, 10_000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=states, codec=st.sampled_from(["raw", "zstd", "auto"]),
       chunk_bytes=st.sampled_from([1, 7, 64, 1000, 1 << 20]),
       writer=st.sampled_from(["native", "reference"]))
def test_each_backend_reads_what_the_other_wrote(state, codec, chunk_bytes, writer):
    reader = "reference" if writer == "native" else "native"
    with tempfile.TemporaryDirectory() as tmp:
        _save_with(writer, state, f"{tmp}/c", codec=codec, chunk_bytes=chunk_bytes)
        assert_same(state, _load_with(reader, f"{tmp}/c"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_like_data_compresses_identically_decodable(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    state = {"w": (torch.randn(512, 1024, generator=gen) * 0.02).to(dtype),
             "m": (torch.randn(512, 1024, generator=gen) * 1e-4).to(dtype)}
    native = shardckpt.save(state, tmp_path / "n", codec="zstd")
    ref = _save_with("reference", state, tmp_path / "r", codec="zstd")
    assert_same(state, _load_with("reference", tmp_path / "n"))
    assert_same(state, _load_with("native", tmp_path / "r"))
    # Same chunks, same shuffle, zstd level 1 of two library builds: sizes within 2%.
    assert abs(native.stored_bytes - ref.stored_bytes) <= 0.02 * ref.stored_bytes
    assert native.stored_bytes < native.raw_bytes * (0.85 if dtype == torch.bfloat16 else 0.95)


def test_raw_files_are_byte_identical(tmp_path):
    gen = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(3000, generator=gen), "b": torch.arange(100, dtype=torch.int16)}
    kw = dict(codec="raw", chunk_bytes=1000, encode_threads=1, write_threads=1)
    shardckpt.save(state, tmp_path / "n", **kw)
    _save_with("reference", state, tmp_path / "r", **kw)
    rel = "data/rank-00000.bin"
    assert (tmp_path / "n" / rel).read_bytes() == (tmp_path / "r" / rel).read_bytes()
