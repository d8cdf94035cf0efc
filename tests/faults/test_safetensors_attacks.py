"""Hostile Hugging Face weights folders: every malformed safetensors header or index is a typed
error raised before a byte of the target changes, with memory bounded by the header cap."""

import json
import os
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardckpt
from shardckpt.errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError,
                              UnsafeCheckpointError)


def _target():
    return {"a": torch.zeros(4, 3), "b": torch.zeros(5, dtype=torch.int32)}


def _write(folder, header: dict, data: bytes, length: int | None = None, pad: bool = True):
    """A model.safetensors from a header dict and data bytes (``length`` overrides the
    header-length field)."""
    folder.mkdir(exist_ok=True)
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return folder


def _valid_header():
    return {"a": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]},
            "b": {"dtype": "I32", "shape": [5], "data_offsets": [48, 68]}}


def _load_bounded(folder, limit=2 << 20):
    """Load into a fresh target; returns (exception, peak traced bytes, target)."""
    target = _target()
    tracemalloc.start()
    try:
        shardckpt.load(target, folder)
        error = None
    except CheckpointError as exc:
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < limit, f"peak {peak} bytes"
    assert all(not t.any() for t in target.values()), "the target changed"
    return error


def test_valid_folder_loads(tmp_path):
    data = torch.arange(12, dtype=torch.float32).numpy().tobytes() + \
        torch.arange(5, dtype=torch.int32).numpy().tobytes()
    folder = _write(tmp_path / "w", _valid_header(), data)
    target = shardckpt.load(_target(), folder)
    assert torch.equal(target["a"], torch.arange(12.0).reshape(4, 3))


@pytest.mark.parametrize("case", ["past_end", "overlap", "hole", "huge_shape", "negative",
                                  "bad_dtype", "shape_mismatch", "not_object", "trailing"])
def test_hostile_entries(tmp_path, case):
    header, data = _valid_header(), bytes(68)
    if case == "past_end":
        header["b"]["data_offsets"] = [48, 10_000_000]
        header["b"]["shape"] = [(10_000_000 - 48) // 4]
    elif case == "overlap":
        header["b"]["data_offsets"] = [40, 60]
        data = bytes(60)
    elif case == "hole":
        header["b"]["data_offsets"] = [52, 72]
        data = bytes(72)
    elif case == "huge_shape":
        header["a"]["shape"] = [2 ** 62, 2 ** 62]
    elif case == "negative":
        header["a"]["shape"] = [-4, -3]
    elif case == "bad_dtype":
        header["a"]["dtype"] = "F33"
    elif case == "shape_mismatch":
        header["a"]["shape"] = [4, 4]
    elif case == "not_object":
        header["a"] = [1, 2, 3]
    elif case == "trailing":
        data = bytes(68 + 1000)
    error = _load_bounded(_write(tmp_path / case, header, data))
    assert isinstance(error, UnsafeCheckpointError), error
    assert "model.safetensors" in str(error)


def test_header_length_past_the_file(tmp_path):
    folder = _write(tmp_path / "w", _valid_header(), bytes(68), length=2 ** 63)
    error = _load_bounded(folder)
    assert isinstance(error, UnsafeCheckpointError) and "exceeds the file" in str(error)


def test_header_length_over_the_cap_is_not_read(tmp_path):
    """A sparse 200 MB file whose header claims 150 MB: refused without reading it."""
    folder = _write(tmp_path / "w", _valid_header(), b"", length=150_000_000)
    os.truncate(folder / "model.safetensors", 200_000_000)
    error = _load_bounded(folder, limit=1 << 20)
    assert isinstance(error, UnsafeCheckpointError) and "exceeds 100000000" in str(error)


def test_header_length_near_the_file_size(tmp_path):
    """Header length = file size - 8 on 4 MiB of junk: read once, refused, memory ~ its size."""
    folder = tmp_path / "w"
    folder.mkdir()
    size = 4 << 20
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", size - 8) + b"{" + b"\x00" * (size - 9))
    error = _load_bounded(folder, limit=3 * size)
    assert isinstance(error, CorruptCheckpointError)


def test_deeply_nested_header(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    text = b"[" * 200_000 + b"]" * 200_000
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
    assert isinstance(_load_bounded(folder), CorruptCheckpointError)


@pytest.mark.parametrize("name", ["../escape.safetensors", "/etc/passwd", "sub/x.safetensors",
                                  "..", ""])
def test_index_cannot_leave_the_folder(tmp_path, name):
    folder = _write(tmp_path / "w", _valid_header(), bytes(68))
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": name, "b": "model-00001-of-00001.safetensors"}}))
    error = _load_bounded(folder)
    assert isinstance(error, UnsafeCheckpointError), error


def test_index_names_a_missing_file(tmp_path):
    folder = _write(tmp_path / "w", _valid_header(), bytes(68))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "gone.safetensors", "b": "model.safetensors"}}))
    assert isinstance(_load_bounded(folder), CheckpointNotFoundError)


def test_links_to_regular_files_load_and_to_devices_do_not(tmp_path):
    """The Hugging Face cache links snapshot files to blobs: that loads. A link to a device or
    a FIFO is refused without reading or blocking on it."""
    data = torch.arange(12, dtype=torch.float32).numpy().tobytes() + bytes(20)
    blobs = _write(tmp_path / "blobs", _valid_header(), data)
    snap = tmp_path / "snapshot"
    snap.mkdir()
    os.symlink(blobs / "model.safetensors", snap / "model.safetensors")
    assert torch.equal(shardckpt.load(_target(), snap)["a"], torch.arange(12.0).reshape(4, 3))
    for name, make in (("dev", lambda p: os.symlink("/dev/zero", p)), ("fifo", os.mkfifo)):
        folder = tmp_path / name
        folder.mkdir()
        make(folder / "model.safetensors")
        assert isinstance(_load_bounded(folder), UnsafeCheckpointError)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzzed_headers_raise_only_typed_errors(tmp_path_factory, flips):
    """Byte flips anywhere in a valid file: it loads or raises a CheckpointError, never
    anything else."""
    data = torch.arange(12, dtype=torch.float32).numpy().tobytes() + bytes(20)
    folder = _write(tmp_path_factory.mktemp("fuzz"), _valid_header(), data)
    raw = bytearray((folder / "model.safetensors").read_bytes())
    for at, value in flips:
        raw[at % len(raw)] = value
    (folder / "model.safetensors").write_bytes(bytes(raw))
    try:
        shardckpt.load(_target(), folder)
    except CheckpointError:
        pass
