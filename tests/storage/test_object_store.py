"""save / load / load_full / verify / async_save / DCP / CLI against object storage (fsspec
memory and S3 on a moto server), byte-compatible with local checkpoints."""

from __future__ import annotations

import fsspec
import pytest
import torch

import shardckpt
from shardckpt import cli
from shardckpt.integrations import dcp
from shardckpt.format import root as rootdir
from shardckpt.storage import open_storage
from tests.helpers import assert_same as assert_state_equal


def make_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(300, 200, generator=g),
                      "b": torch.randn(200, generator=g).to(torch.bfloat16),
                      "i": torch.arange(1000, dtype=torch.int64)},
            "opt": {"step": 7, "lr": 0.001, "name": "adamw"},
            "empty": torch.empty(0, 3)}


@pytest.fixture(params=["memory", "s3"])
def store(request):
    """``(url, storage_options)`` of a fresh prefix on each object store."""
    if request.param == "memory":
        return request.getfixturevalue("memory_url"), None
    return request.getfixturevalue("s3_url")


@pytest.mark.parametrize("codec", ["auto", "zstd"])
def test_save_load_verify(store, codec):
    base, opts = store
    url, state = f"{base}/step-1", make_state()
    info = shardckpt.save(state, url, codec=codec, chunk_bytes=64 << 10, storage_options=opts)
    assert info.path == url.replace("memory:///", "memory://")
    target = make_state(seed=1)
    shardckpt.load(target, url, storage_options=opts)
    assert_state_equal(target, state)
    assert_state_equal(shardckpt.load_full(url, storage_options=opts), state)
    report = shardckpt.verify(url, storage_options=opts)
    assert report.tensors == 4 and report.raw_bytes == 300 * 200 * 4 + 200 * 2 + 8000
    assert rootdir.list_checkpoints(open_storage(base, opts), validate=True) == ["step-1"]


def test_byte_identical_to_local(memory_url, tmp_path):
    state = make_state()
    # One encoder: chunks then land in order (several place them as they finish, either way).
    one = dict(codec="zstd", files_per_rank=1, encode_threads=1, chunk_bytes=64 << 10)
    shardckpt.save(state, tmp_path / "ck", **one)
    shardckpt.save(state, f"{memory_url}/ck", **one)
    fs = fsspec.filesystem("memory")
    remote = memory_url[len("memory://"):]
    data = "data/rank-00000.bin"
    assert fs.cat_file(f"/{remote}/ck/{data}") == (tmp_path / "ck" / data).read_bytes()
    # A remote checkpoint copied to disk is a local checkpoint.
    fs.get(f"/{remote}/ck", str(tmp_path / "copy"), recursive=True)
    assert_state_equal(shardckpt.load_full(tmp_path / "copy"), state)


def test_exists_and_overwrite(store):
    base, opts = store
    url = f"{base}/ck"
    shardckpt.save(make_state(0), url, storage_options=opts)
    with pytest.raises(shardckpt.CheckpointExistsError):
        shardckpt.save(make_state(1), url, storage_options=opts)
    shardckpt.save(make_state(1), url, overwrite=True, storage_options=opts)
    assert_state_equal(shardckpt.load_full(url, storage_options=opts), make_state(1))


def test_missing_checkpoint(store):
    base, opts = store
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.load_full(f"{base}/nothing", storage_options=opts)


def test_async_save(store):
    base, opts = store
    url, state = f"{base}/async", make_state()
    handle = shardckpt.async_save(state, url, storage_options=opts)
    state["model"]["w"].add_(1)  # after the stall the caller owns its tensors again
    info = handle.result(timeout=120)
    assert info.path.endswith("async")
    assert_state_equal(shardckpt.load_full(url, storage_options=opts)["model"]["w"],
                       make_state()["model"]["w"])


def test_dcp_adapters(memory_url):
    import torch.distributed.checkpoint as tdcp
    state = {"w": torch.randn(64, 64), "n": torch.arange(5)}
    url = f"{memory_url}/dcp"
    tdcp.save(state, storage_writer=dcp.Writer(url))
    target = {"w": torch.zeros(64, 64), "n": torch.zeros(5, dtype=torch.int64)}
    tdcp.load(target, storage_reader=dcp.Reader(url))
    assert_state_equal(target, state)


def test_cli(memory_url, capsys):
    url = f"{memory_url}/ck"
    shardckpt.save(make_state(), url)
    assert cli.main(["verify", url, "-o", "anon=false"]) == 0
    assert cli.main(["inspect", url]) == 0
    assert "4 tensors" in capsys.readouterr().out


def test_corrupt_object_is_named(memory_url):
    url = f"{memory_url}/ck"
    shardckpt.save(make_state(), url, codec="raw", files_per_rank=1)
    storage = open_storage(memory_url)
    rel = "ck/data/rank-00000.bin"
    data = bytearray(storage.read(rel))
    data[100] ^= 0xFF
    storage.write(rel, bytes(data), exclusive=False)
    with pytest.raises(shardckpt.CorruptCheckpointError, match="rank-00000.bin"):
        shardckpt.verify(url)
    storage.write(rel, bytes(data[:-5]), exclusive=False)
    with pytest.raises(shardckpt.CorruptCheckpointError, match="bytes"):
        shardckpt.load_full(url)


def test_index_form_on_object_stores(store, monkeypatch):
    """Revision 1.4 (chunk index files) on object stores: saved, overwritten (an .idx key is
    a checkpoint's own, FORMAT.md 4.3), loaded and verified."""
    monkeypatch.setenv("SHARDCKPT_CHUNK_INDEX", "1")
    base, opts = store
    url, state = f"{base}/step-2", make_state()
    shardckpt.save(make_state(seed=3), url, chunk_bytes=64 << 10, storage_options=opts)
    shardckpt.save(state, url, chunk_bytes=64 << 10, storage_options=opts, overwrite=True)
    storage = open_storage(url, opts)
    assert "rank-00000.idx" in storage.list("data")
    assert_state_equal(shardckpt.load_full(url, storage_options=opts), state)
    assert shardckpt.verify(url, storage_options=opts).tensors == 4
