"""Hostile checkpoints (SECURITY.md): no code runs, no file outside is touched, no bomb goes off.

The attacker here can write every byte of the checkpoint folder and re-sign the manifest, so the
tests plant their payloads with valid checksums: the structural checks must refuse them.
"""

import base64
import json
import os
import pickle

import numpy as np
import pytest
import torch

import shardckpt
from shardckpt import cli
from shardckpt.errors import UnsafeCheckpointError
from shardckpt.testing.hostile import (edit_table, pickle_payload, read_doc, resign, rewrite,
                                       rle_frame, set_cell)
from shardckpt.types import FILE_HEADER
from tests.helpers import assert_same

from .conftest import probe_readers, small_state


def every_reader(path) -> list:
    """Run every entry point that reads a checkpoint; what each returned or raised."""
    outcomes = []
    for name, call in [
            ("load", lambda: shardckpt.load(_zeros_like(small_state()), path, strict=False)),
            ("load_full", lambda: shardckpt.load_full(path)),
            ("verify", lambda: shardckpt.verify(path)),
            ("cli inspect", lambda: cli.main(["inspect", str(path), "--json"])),
            ("cli verify", lambda: cli.main(["verify", str(path)]))]:
        try:
            outcomes.append((name, call()))
        except Exception as exc:  # noqa: BLE001 - each outcome is asserted by the caller
            outcomes.append((name, exc))
    return outcomes


def assert_refused(outcomes, *, manifest_is_fine: bool = False, match: str = "") -> None:
    """Every reader raised UnsafeCheckpointError (the CLI: exit status 1). ``inspect`` reads only
    the manifest, so where the manifest itself is fine it succeeds."""
    for name, outcome in outcomes:
        if name == "cli inspect" and manifest_is_fine:
            assert outcome == 0
        elif name.startswith("cli"):
            assert outcome == 1, name
        else:
            assert isinstance(outcome, UnsafeCheckpointError), (name, outcome)
            assert match in str(outcome), (name, outcome)


def _zeros_like(state):
    return {k: _zeros_like(v) if isinstance(v, dict) else
            torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _rename_tensor(doc, old: str, new: str) -> None:
    doc["tensors"][new] = doc["tensors"].pop(old)

    def walk(node):
        if isinstance(node, dict):
            if node.get("tensor") == old:
                node["tensor"] = new
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(doc["tree"])


def _plant_pickles(path, payload: bytes) -> None:
    """A pickle wherever the format, or a careless reader, could take one from."""
    text = payload.decode("latin-1")

    def mutate(doc):
        doc["metadata"] = {"pickle": text, "b64": base64.b64encode(payload).decode(),
                           "nested": [{"__reduce__": text}]}
        doc["writer"] = {"name": text, "version": text}
        doc["tree"]["dict"].append([text, {"str": text}])
        _rename_tensor(doc, "model/b", text)
    rewrite(path, mutate)
    for extra in ["extra.pkl", "model.pt", "optimizer.pth", "data/rank-00000.pkl",
                  "data/rank-00000.pt", "state.bin"]:
        (path / extra).write_bytes(payload)


def test_no_pickle_payload_anywhere_is_ever_executed(tmp_path, monkeypatch, audit):
    marker = tmp_path / "PWNED"
    payload = pickle_payload(marker)
    path = tmp_path / "ckpt"
    state = small_state()
    state["blob"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)  # data bytes
    shardckpt.save(state, path, codec="raw", chunk_bytes=64)
    _plant_pickles(path, payload)
    real_loads = pickle.loads

    def refuse(*args, **kwargs):
        raise AssertionError("the load path unpickled something")
    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load"), (np, "load")]:
        monkeypatch.setattr(module, name, refuse)

    outcomes = every_reader(path)

    assert [(n, o) for n, o in outcomes if isinstance(o, Exception)] == []
    assert audit.of("pickle.find_class") == [] and audit.of("subprocess.Popen") == []
    assert not marker.exists()
    full = dict(outcomes)["load_full"]
    assert bytes(full["blob"].numpy()) == payload  # the pickle came back as plain bytes
    assert full[payload.decode("latin-1")] == payload.decode("latin-1")
    assert json.loads(json.dumps(read_doc(path)["metadata"]))["pickle"] == \
        payload.decode("latin-1")
    # The payload is live: unpickling it does create the marker, and the audit hook sees it.
    real_loads(payload).close()
    assert marker.exists() and audit.of("pickle.find_class")


@pytest.mark.parametrize("bad", ["s3://other-bucket/data/rank-00000.bin",
                                 "file:///etc/passwd", "https://evil.example/x.bin",
                                 "data/../../../etc/passwd", "/etc/passwd",
                                 "data/rank-00000.bin\x00.txt", "data\\..\\..\\x.bin",
                                 "data//rank-00000.bin", "~/x.bin"])
def test_unsafe_paths_are_refused_before_any_io(saved, audit, bad):
    path, _ = saved
    rewrite(path, lambda d: d["files"][1].update(path=bad))
    assert_refused(every_reader(path))
    opened = audit.opened()
    assert opened and all(p.endswith("manifest.json") for p in opened), opened


def _symlink_elsewhere(path, tmp_path, how):
    """Make the checkpoint's second data file (or its data folder) point outside it."""
    target = path / "data" / "rank-00000.1.bin"
    sibling = tmp_path / "sibling"
    shardckpt.save(small_state(1), sibling, codec="zstd", chunk_bytes=256)
    if how == "data file -> /etc/passwd":
        target.unlink()
        os.symlink("/etc/passwd", target)
    elif how == "data file -> sibling checkpoint":
        size = target.stat().st_size
        target.unlink()
        other = sibling / "data" / "rank-00000.1.bin"
        os.truncate(other, size)  # same size and header: only the location gives it away
        os.symlink(other, target)
    elif how == "data folder -> sibling checkpoint":
        os.rename(path / "data", tmp_path / "moved")
        os.symlink(sibling / "data", path / "data")
    elif how == "relative link climbing out":
        target.unlink()
        os.symlink("../../sibling/data/rank-00000.1.bin", target)


@pytest.mark.parametrize("how", ["data file -> /etc/passwd", "data file -> sibling checkpoint",
                                 "data folder -> sibling checkpoint",
                                 "relative link climbing out"])
def test_symlinks_out_of_the_checkpoint_are_refused_before_reading_data(saved, tmp_path, audit,
                                                                         how):
    path, _ = saved
    _symlink_elsewhere(path, tmp_path, how)
    audit.events.clear()
    assert_refused(every_reader(path), manifest_is_fine=True, match="outside the checkpoint")
    # Not one data file was opened: every path is resolved before the first read.
    assert [p for p in audit.opened() if not p.endswith("manifest.json")] == []


@pytest.mark.parametrize("what", ["manifest -> /etc/passwd", "manifest -> /dev/zero",
                                  "manifest is a FIFO", "data file is a FIFO"])
def test_manifest_or_data_that_is_not_a_file_in_the_checkpoint_is_refused(saved, what):
    path, _ = saved
    manifest = path / "manifest.json"
    if what.startswith("manifest ->"):
        manifest.unlink()
        os.symlink(what.split(" -> ")[1], manifest)
    elif what == "manifest is a FIFO":  # nobody writes: opening it would block forever
        manifest.unlink()
        os.mkfifo(manifest)
    else:
        data = path / "data" / "rank-00000.bin"
        data.unlink()
        os.mkfifo(data)
    assert_refused(every_reader(path), manifest_is_fine=what.startswith("data"))


# --- sizes ---------------------------------------------------------------------------------

def _add_data_file(doc, path, name: str, stored: bytes) -> int:
    """Append a data file holding ``stored`` after the header; its index in ``files``."""
    (path / "data" / name).write_bytes(FILE_HEADER + stored)
    doc["files"].append({"path": f"data/{name}", "size": len(FILE_HEADER) + len(stored),
                         "rank": 0})
    return len(doc["files"]) - 1


def _point_chunk(doc, key, row, file, stored, codec_index, count=None):
    crc = shardckpt.codecs.backend.crc32c(stored)

    def edit(rows):
        rows[row, 0], rows[row, 1], rows[row, 2] = file, len(FILE_HEADER), len(stored)
        rows[row, 5], rows[row, 6] = codec_index, crc
        if count is not None:
            rows[row, 4] = count
        return rows
    edit_table(doc, key, "chunks", edit)


def _zstd_codec(doc) -> int:
    doc["codecs"].append([{"id": "zstd", "level": 1}])
    return len(doc["codecs"]) - 1


def _bomb(kind):
    """A manifest edit that plants a decompression bomb or an absurd size (see the ids)."""
    def mutate(doc, path):
        if kind == "frame declares 2 GiB for a 256-byte chunk":
            frame = rle_frame(1 << 31)
            _point_chunk(doc, "model/b", 0, _add_data_file(doc, path, "bomb.bin", frame),
                         frame, _zstd_codec(doc))
        elif kind == "frame without a content size":
            import zstandard
            frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
            _point_chunk(doc, "model/b", 0, _add_data_file(doc, path, "bomb.bin", frame),
                         frame, _zstd_codec(doc))
        elif kind == "right size, then a second frame of 2 GiB":
            import zstandard
            first = zstandard.ZstdCompressor().compress(bytes(256))
            frame = first + rle_frame(1 << 31)
            _point_chunk(doc, "model/b", 0, _add_data_file(doc, path, "bomb.bin", frame),
                         frame, _zstd_codec(doc))
        elif kind == "tiny frame claims 2 GiB (count edited to match)":
            frame = rle_frame(1 << 10, declared=1 << 31)
            doc["tensors"]["model/b"]["shape"] = [1 << 29]
            _point_chunk(doc, "model/b", 0, _add_data_file(doc, path, "bomb.bin", frame),
                         frame, _zstd_codec(doc), count=1 << 29)
            edit_table(doc, "model/b", "shards", set_cell(0, 1, 1 << 29))
        elif kind == "1 TiB tensor from 512 rows naming the same 64 KiB":
            frame = rle_frame(1 << 31)
            file = _add_data_file(doc, path, "bomb.bin", frame)
            crc, codec = shardckpt.codecs.backend.crc32c(frame), _zstd_codec(doc)
            n = 512
            rows = np.array([[file, len(FILE_HEADER), len(frame), i << 31, 1 << 31, codec, crc]
                             for i in range(n)], np.int64)
            doc["tensors"]["huge"] = {"dtype": "uint8", "shape": [n << 31],
                                      "shards": shardckpt.format.tables.encode(
                                          np.array([[0, n << 31, n]], np.int64)),
                                      "chunks": shardckpt.format.tables.encode(rows)}
            doc["tree"]["dict"].append(["huge", {"tensor": "huge"}])
        elif kind == "2**60 elements":
            doc["tensors"]["model/b"]["shape"] = [1 << 30, 1 << 30]
        elif kind == "raw length disagrees with the shape":
            doc["tensors"]["model/b"]["shape"] = [65]
        elif kind == "shard claims 2**40 chunks":
            edit_table(doc, "model/b", "shards", set_cell(0, 1, 1 << 40))
        elif kind == "raw chunk shorter than its count":
            edit_table(doc, "model/b", "chunks", set_cell(0, 2, 200))
    return mutate


BOMBS = ["frame declares 2 GiB for a 256-byte chunk", "frame without a content size",
         "right size, then a second frame of 2 GiB",
         "tiny frame claims 2 GiB (count edited to match)",
         "1 TiB tensor from 512 rows naming the same 64 KiB", "2**60 elements",
         "raw length disagrees with the shape", "shard claims 2**40 chunks",
         "raw chunk shorter than its count"]


def _plant_bomb(path, kind) -> None:
    doc = read_doc(path)
    _bomb(kind)(doc, path)
    (path / "manifest.json").write_bytes(resign(doc))


def test_bombs_and_absurd_sizes_are_refused_without_allocating(tmp_path):
    paths = []
    for i, kind in enumerate(BOMBS):
        path = tmp_path / f"c{i}"
        shardckpt.save(small_state(), path, codec="zstd", chunk_bytes=256)
        _plant_bomb(path, kind)
        paths.append(str(path))
    # A fresh process, so its peak RSS is the bombs' doing (each claims >= 2 GiB).
    out = probe_readers(paths, reference=True)
    for kind, path in zip(BOMBS, paths):
        for reader in ("load_full", "verify", "reference"):
            assert out[f"{path} {reader}"][0] in ("UnsafeCheckpointError",
                                                  "CorruptCheckpointError"), (kind, reader, out)
    assert out["peak_rss_mib"] < 1024, out  # claimed: 2 GiB to 1 TiB


def test_a_bomb_like_but_honest_chunk_still_loads(tmp_path):
    """The size checks are not too strict: a real 4 MiB of zeros in a few-hundred-byte frame
    (zstd at its densest) loads."""
    path = tmp_path / "zeros"
    state = {"z": torch.zeros(1 << 22, dtype=torch.uint8)}
    shardckpt.save(state, path, codec="zstd", chunk_bytes=1 << 22)
    doc = read_doc(path)
    frame = rle_frame(1 << 22)
    _point_chunk(doc, "z", 0, _add_data_file(doc, path, "dense.bin", frame), frame,
                 _zstd_codec(doc))
    (path / "manifest.json").write_bytes(resign(doc))
    assert_same(state, shardckpt.load_full(path))
    shardckpt.verify(path)
