"""Issue 25 case 10: ``shardckpt copy`` commits only a checkpoint that loads. A referenced file's
new name cannot collide with an own file's (any legal name may be one), the copy is checked
before it commits, and a checkpoint that others use as their base is never replaced."""

import os
import tempfile
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import shardckpt
from shardckpt.format import manifest as manifest_mod
from shardckpt.cli import main as cli_main
from shardckpt.format.opening import open_manifest
from shardckpt.storage import open_checkpoint
from shardckpt.testing.faults import flip_byte
from shardckpt.ops.copy import copy_checkpoint
from tests.helpers import assert_same

CHUNK = 4096


def state(step: int) -> dict:
    gen = torch.Generator().manual_seed(5)
    return {"frozen": torch.randn(4096, generator=gen),
            "live": torch.randn(2048, generator=gen) + step, "step": step}


def incremental_pair(root) -> tuple[str, str]:
    """``base`` and ``inc`` (which references base's files) under ``root``."""
    base, inc = os.path.join(root, "base"), os.path.join(root, "inc")
    shardckpt.save(state(1), base, content_hashes=True, chunk_bytes=CHUNK)
    shardckpt.save(state(2), inc, base="base", chunk_bytes=CHUNK)
    return base, inc


def rename_own(path: str, names: list[str]) -> None:
    """Give ``path``'s own data files the legal names ``names`` (in order), manifest included."""
    m = open_manifest(*open_checkpoint(path))
    files, it = list(m.files), iter(names)
    for i, f in enumerate(files):
        if f.base is None:
            new = next(it, None)
            if new is None:
                break
            os.rename(os.path.join(path, f.path), os.path.join(path, new + ".tmp"))
            files[i] = replace(f, path=new)
    for f in files:  # two steps: a new name may be an old one
        if f.base is None and os.path.exists(os.path.join(path, f.path + ".tmp")):
            os.rename(os.path.join(path, f.path + ".tmp"), os.path.join(path, f.path))
    with open(os.path.join(path, "manifest.json"), "wb") as fh:
        fh.write(manifest_mod.to_json(replace(m, files=tuple(files))))


def ref_names(path: str) -> list[str]:
    """The names ``copy`` used to give the referenced files of ``path``."""
    m = open_manifest(*open_checkpoint(path))
    return [f"data/ref-{i:05d}.bin" for i, f in enumerate(m.files) if f.base is not None]


def test_an_own_file_named_like_a_materialised_reference(tmp_path):
    _, inc = incremental_pair(str(tmp_path))
    rename_own(inc, ref_names(inc)[::-1])  # each own file takes a reference's old name
    assert_same(state(2), shardckpt.load_full(inc))
    out = str(tmp_path / "out")
    assert cli_main(["copy", inc, out]) == 0
    assert_same(state(2), shardckpt.load_full(out))
    assert shardckpt.verify(out).ok
    paths = [f.path for f in open_manifest(*open_checkpoint(out)).files]
    assert len(set(paths)) == len(paths)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=2,
                      unique_by=lambda p: p))
def test_no_own_name_collides_with_a_materialised_one(picks):
    """Own files named ``data/ref-NNNNN.bin`` or ``data/ref-NNNNN.K.bin`` for NNNNN near the
    reference indexes and K the suffixes a collision would try."""
    names = [f"data/ref-{i:05d}" + (f".{k}" if k else "") + ".bin" for i, k in picks]
    with tempfile.TemporaryDirectory() as root:
        _, inc = incremental_pair(root)
        rename_own(inc, names)
        out = os.path.join(root, "out")
        copy_checkpoint(inc, out)
        assert_same(state(2), shardckpt.load_full(out))


def test_copy_overwrite_never_replaces_a_base(tmp_path):
    base, inc = incremental_pair(str(tmp_path))
    other = str(tmp_path / "other")
    shardckpt.save(state(9), other)
    with pytest.raises(shardckpt.CheckpointExistsError, match="reference its data"):
        copy_checkpoint(other, base, overwrite=True)
    assert cli_main(["copy", "--overwrite", other, base]) != 0
    assert_same(state(2), shardckpt.load_full(inc))
    assert_same(state(1), shardckpt.load_full(base))


def test_copy_onto_itself_is_refused(tmp_path, memory_url):
    for root in (str(tmp_path), memory_url):
        src = f"{root}/solo"
        shardckpt.save(state(3), src, chunk_bytes=CHUNK)
        with pytest.raises(shardckpt.CheckpointExistsError, match="onto itself"):
            copy_checkpoint(src, f"{root}/./solo" if root == str(tmp_path) else src,
                            overwrite=True)
        assert_same(state(3), shardckpt.load_full(src))


@pytest.mark.parametrize("referenced", [False, True])
def test_a_corrupt_chunk_is_not_copied_into_a_committed_checkpoint(tmp_path, referenced):
    base, inc = incremental_pair(str(tmp_path))
    m = open_manifest(*open_checkpoint(inc))
    i = next(i for i, f in enumerate(m.files) if (f.base is not None) == referenced)
    row = next(r for t in m.tensors.values() for r in t.chunks if r[0] == i)  # a used chunk
    f = m.files[i]
    flip_byte(os.path.join(str(tmp_path), f.base or "inc", f.path), int(row[1] + row[2] // 2))
    out = str(tmp_path / "out")
    with pytest.raises(shardckpt.CorruptCheckpointError):
        copy_checkpoint(inc, out)
    assert not os.path.exists(out)
    assert [n for n in os.listdir(tmp_path) if n not in ("base", "inc")] == []


def test_copy_into_its_own_folder_is_refused(tmp_path):
    _, inc = incremental_pair(str(tmp_path))
    with pytest.raises(shardckpt.CheckpointExistsError, match="into itself"):
        copy_checkpoint(inc, os.path.join(inc, "sub"))
    assert sorted(os.listdir(inc)) == ["data", "manifest.json"]
