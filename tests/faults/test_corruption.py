"""Corruption of a committed checkpoint: each kind is detected by load, load_full and verify,
and the error names the file (and, where the damage sits in one, the tensor and chunk).

tests/test_faults.py flips every byte of a data file and tests/format/test_manifest.py every byte of
a manifest; this covers each kind of damage once, through every reader, with its diagnosis.
"""

import os
import shutil

import pytest
import torch

import shardckpt
from shardckpt import cli
from shardckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from shardckpt.format.opening import open_manifest
from shardckpt.storage import open_checkpoint
from shardckpt.testing import flip_byte, truncate
from shardckpt.testing.hostile import edit_table, rewrite, set_cell

from .conftest import small_state

DATA0, DATA1, MANIFEST = "data/rank-00000.bin", "data/rank-00000.1.bin", "manifest.json"


def chunk_of(path, key: str, compressed: bool):
    """``(file, offset, row)`` of one of tensor ``key``'s chunks, stored raw or compressed."""
    m = open_manifest(*open_checkpoint(path))
    kinds = [bool(chain) for chain in m.codecs]
    for row, c in enumerate(m.tensors[key].chunks.tolist()):
        if kinds[c[5]] == compressed:
            return m.files[c[0]].path, c[1], row
    raise LookupError(key)


def _flip_chunk(key, compressed):
    def damage(path, tmp_path):
        file, offset, row = chunk_of(path, key, compressed)
        flip_byte(path / file, offset + 1, 0x10)
        return file, key, row
    return damage


def _flip_manifest_at(needle: bytes):
    def damage(path, tmp_path):
        data = (path / MANIFEST).read_bytes()
        flip_byte(path / MANIFEST, data.index(needle) + len(needle) + 2, 0x01)
        return MANIFEST, None, None
    return damage


def _table_crc_edited(path, tmp_path):
    """The chunk table's checksum of one chunk changed and the manifest re-signed: the data
    check catches what the manifest check cannot."""
    file, _, row = chunk_of(path, "model/b", compressed=False)
    rewrite(path, lambda d: edit_table(d, "model/b", "chunks", set_cell(row, 6, 12345)))
    return file, "model/b", row


def _other_manifest(codec):
    def damage(path, tmp_path):
        other = tmp_path / "other"
        shardckpt.save(small_state(1), other, codec=codec, chunk_bytes=256)
        if codec == "raw":  # make this one raw too: same file sizes, only the bytes differ
            shutil.rmtree(path)
            shardckpt.save(small_state(0), path, codec="raw", chunk_bytes=256)
        shutil.copy(other / MANIFEST, path / MANIFEST)
        return (DATA0 if codec == "raw" else None), None, None
    return damage


def _swap_files(path, tmp_path):
    os.rename(path / DATA0, path / "x")
    os.rename(path / DATA1, path / DATA0)
    os.rename(path / "x", path / DATA1)
    return None, None, None


def _gone(rel, error=CorruptCheckpointError):
    def damage(path, tmp_path):
        os.unlink(path / rel)
        return rel, None, None
    return damage


def _cut(rel, nbytes):
    def damage(path, tmp_path):
        truncate(path / rel, nbytes)
        return rel, None, None
    return damage


def _header(path, tmp_path):
    flip_byte(path / DATA1, 3)
    return DATA1, None, None


def _edited_value(path, tmp_path):
    data = (path / MANIFEST).read_bytes().replace(b'"int":7', b'"int":8')
    (path / MANIFEST).write_bytes(data)  # the step changed, the CRC left as it was
    return MANIFEST, None, None


CASES = {
    "bit flip in a raw chunk": (_flip_chunk("model/w", False), "checksum"),
    "bit flip in a compressed chunk": (_flip_chunk("model/ids", True), "checksum"),
    "bit flip in a data file header": (_header, "header"),
    "bit flip in a table (manifest bytes)": (_flip_manifest_at(b'"chunks":"'), "checksum"),
    "bit flip in the manifest JSON": (_flip_manifest_at(b'"world_size"'), "checksum"),
    "table edited and re-signed": (_table_crc_edited, "checksum"),
    "manifest edited (CRC not updated)": (_edited_value, "checksum mismatch"),
    "data file truncated": (_cut(DATA0, 7), "truncated"),
    "manifest truncated": (_cut(MANIFEST, 1), "checksum"),
    "data file missing": (_gone(DATA1), "missing"),
    "data files swapped": (_swap_files, "bytes"),
    "manifest of another checkpoint (same sizes)": (_other_manifest("raw"), "checksum"),
    "manifest of another checkpoint (other sizes)": (_other_manifest("zstd"), "bytes"),
}


def _zeros():
    state = small_state()
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    return state


@pytest.mark.parametrize("case", CASES)
def test_corruption_is_detected_and_named_by_every_reader(saved, tmp_path, case):
    path, _ = saved
    damage, words = CASES[case]
    file, tensor, chunk = damage(path, tmp_path)
    for name, read in [("load", lambda: shardckpt.load(_zeros(), path)),
                       ("load_full", lambda: shardckpt.load_full(path)),
                       ("verify", lambda: shardckpt.verify(path))]:
        with pytest.raises(CorruptCheckpointError) as info:
            read()
        err = info.value
        assert words in str(err), (name, err)
        assert err.file is not None and err.file in (DATA0, DATA1, MANIFEST), (name, err)
        if file is not None:
            assert err.file == file, (name, err)
        if tensor is not None:
            assert (err.tensor, err.chunk) == (tensor, chunk), (name, err)
            assert f"tensor={tensor!r}" in str(err)
    assert cli.main(["verify", str(path)]) == 1


def test_missing_manifest_is_an_incomplete_checkpoint_by_every_reader(saved):
    path, _ = saved
    os.unlink(path / MANIFEST)
    for read in [lambda: shardckpt.load(_zeros(), path), lambda: shardckpt.load_full(path),
                 lambda: shardckpt.verify(path)]:
        with pytest.raises(IncompleteCheckpointError, match="no manifest.json") as info:
            read()
        assert str(path) in str(info.value)
