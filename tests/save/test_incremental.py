"""Incremental saves (FORMAT.md 3.6): unchanged chunks are referenced, loads and verify follow
the references, and references cannot leave the root."""

import json
import os
import shutil

import pytest
import torch

import shardckpt
from shardckpt import codecs
from shardckpt.codecs import reference
from shardckpt.format.opening import open_manifest
from shardckpt.storage import open_checkpoint, open_storage
from tests.helpers import assert_same

CHUNK = 4096  # bytes: every tensor below spans several chunks


def _state(gen: torch.Generator) -> dict:
    return {"model": {"embed": torch.randn(64, 64, generator=gen),
                      "block0": torch.randn(4096, generator=gen).to(torch.bfloat16),
                      "block1": torch.randn(2048, generator=gen, dtype=torch.float64),
                      "head": torch.randn(32, 32, generator=gen),
                      "mask": torch.rand(3000, generator=gen) > 0.5},
            "step": 1, "lr": 0.5}


def _manifest(path):
    return open_manifest(*open_checkpoint(path))


def _own_bytes(path) -> int:
    data = os.path.join(path, "data")
    return sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))


@pytest.mark.parametrize("frozen", [(), ("embed",), ("embed", "block0", "mask"),
                                    ("embed", "block0", "block1", "head", "mask")])
@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_frozen_tensors_are_referenced_and_load_bit_exactly(tmp_path, frozen, codec):
    gen = torch.Generator().manual_seed(len(frozen))
    state = _state(gen)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shardckpt.save(state, a, codec=codec, chunk_bytes=CHUNK, content_hashes=True)
    for name, t in state["model"].items():
        if name not in frozen:  # a training step changes every element of the others
            t.copy_(~t if t.dtype == torch.bool else t * 1.5 + 1)
    state["step"] = 2
    shardckpt.save(state, b, codec=codec, chunk_bytes=CHUNK, base="a")
    assert_same(state, shardckpt.load_full(b))
    m_a, m_b = _manifest(a), _manifest(b)
    changed = [k for k in m_b.tensors if k.split("/")[1] not in frozen]
    stored = {k: int(t.chunks[:, 2].sum()) for k, t in m_b.tensors.items()}
    # What b wrote itself is exactly the stored size of what changed (plus file headers).
    headers = 16 * len(os.listdir(os.path.join(b, "data")))
    assert _own_bytes(b) == sum(stored[k] for k in changed) + headers
    for key in m_b.tensors:  # frozen tensors' rows point into a's files, nowhere else
        files = {m_b.files[i] for i in m_b.tensors[key].chunks[:, 0]}
        assert all((f.base == "a") == (key not in changed) for f in files)
    assert shardckpt.verify(b).ok and shardckpt.verify(a).ok
    assert m_a.hashes is not None and len(m_b.hashes) == sum(len(t.chunks)
                                                             for t in m_b.tensors.values())


def test_noop_save_writes_only_a_manifest_and_references_are_one_hop(tmp_path):
    state = _state(torch.Generator().manual_seed(1))
    shardckpt.save(state, str(tmp_path / "a"), chunk_bytes=CHUNK, content_hashes=True)
    state["model"]["head"] += 1
    shardckpt.save(state, str(tmp_path / "b"), chunk_bytes=CHUNK, base="a")
    info = shardckpt.save(state, str(tmp_path / "c"), chunk_bytes=CHUNK,
                          base=str(tmp_path / "b"))
    assert info.stored_bytes == 0 and info.stats["chunks_reused"] > 0
    assert os.listdir(tmp_path / "c" / "data") == []
    assert sorted(os.listdir(tmp_path / "c")) == ["data", "manifest.json"]
    m = _manifest(str(tmp_path / "c"))
    assert {f.base for f in m.files} == {"a", "b"}  # "a"'s files directly, not through "b"
    assert_same(state, shardckpt.load_full(str(tmp_path / "c")))


def test_async_save_and_object_storage_reference_a_base(tmp_path, memory_url):
    state = _state(torch.Generator().manual_seed(2))
    for root in (str(tmp_path), memory_url):
        shardckpt.save(state, f"{root}/a", chunk_bytes=CHUNK, content_hashes=True)
        state["model"]["embed"] -= 1
        handle = shardckpt.async_save(state, f"{root}/b", chunk_bytes=CHUNK, base="a",
                                      staging_budget_bytes=1 << 20)
        head = state["model"]["head"].clone()
        state["model"]["head"] += 7  # after the copy: the checkpoint has the old values
        handle.result()
        loaded = shardckpt.load_full(f"{root}/b")
        assert torch.equal(loaded["model"]["head"], head)
        assert torch.equal(loaded["model"]["embed"], state["model"]["embed"])
        m = _manifest(f"{root}/b")
        assert any(f.base == "a" for f in m.files)
        assert shardckpt.verify(f"{root}/b", collect=True).ok
        state["model"]["head"] = head


def test_native_and_reference_hashes_agree(tmp_path):
    data = torch.randn(10000).numpy().tobytes()
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    chunks = [(buf.data_ptr(), 4000, 4), (buf.data_ptr() + 4000, 6000, 4)]
    st, recs, stats = codecs.backend.write_file(str(tmp_path / "f"), chunks, "zstd", 1, 1, 1,
                                                1 << 20, False, b"H" * 16, True, b"")
    assert st[0] == 0
    assert [r[4] for r in recs] == [reference.content_hash(data[:4000]),
                                    reference.content_hash(data[4000:10000])]
    known = recs[1][4]
    st, recs2, stats = codecs.backend.write_file(str(tmp_path / "g"), chunks, "zstd", 1, 1, 1,
                                                 1 << 20, False, b"H" * 16, True, known)
    assert recs2[1][1] == 0 and recs2[0][1] > 0 and stats["chunks_reused"] == 1
    assert os.path.getsize(tmp_path / "g") == 16 + recs2[0][1]


def _rewrite_manifest(path, edit):
    """Edit a manifest's JSON and re-seal its checksum (a hostile but well-formed manifest)."""
    from shardckpt.format import manifest as manifest_mod
    raw = open(os.path.join(path, "manifest.json"), "rb").read()
    doc = json.loads(raw)
    doc.pop("manifest_crc32c")
    edit(doc)
    body = json.dumps(doc, separators=(",", ":")).encode()[:-1]
    sealed = body + manifest_mod.CRC_MEMBER + str(codecs.backend.crc32c(body)).encode() + b"}"
    open(os.path.join(path, "manifest.json"), "wb").write(sealed)


@pytest.mark.parametrize("base", ["../outside", "..", ".hidden", "a/b", "/etc", 7])
def test_a_reference_escaping_the_root_is_refused(tmp_path, base):
    root = tmp_path / "root"
    root.mkdir()
    state = _state(torch.Generator().manual_seed(3))
    shardckpt.save(state, str(root / "a"), chunk_bytes=CHUNK, content_hashes=True)
    shardckpt.save(state, str(root / "b"), chunk_bytes=CHUNK, base="a")

    def escape(doc):
        for f in doc["files"]:
            if "base" in f:
                f["base"] = base
    _rewrite_manifest(str(root / "b"), escape)
    for call in (shardckpt.load_full, shardckpt.verify):
        with pytest.raises(shardckpt.UnsafeCheckpointError, match="same root"):
            call(str(root / "b"))


def test_a_symlinked_base_leading_out_of_the_root_is_refused(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    state = _state(torch.Generator().manual_seed(4))
    shardckpt.save(state, str(root / "a"), chunk_bytes=CHUNK, content_hashes=True)
    shardckpt.save(state, str(root / "b"), chunk_bytes=CHUNK, base="a")
    shutil.move(str(root / "a"), str(elsewhere))
    os.symlink(elsewhere, root / "a")
    with pytest.raises(shardckpt.UnsafeCheckpointError, match="outside the checkpoints' root"):
        shardckpt.load_full(str(root / "b"))
    report = shardckpt.verify(str(root / "b"), collect=True)
    assert report.problems and isinstance(report.problems[0], shardckpt.UnsafeCheckpointError)


def test_a_base_in_another_root_is_refused(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    state = _state(torch.Generator().manual_seed(5))
    shardckpt.save(state, str(tmp_path / "one" / "a"), content_hashes=True)
    with pytest.raises(shardckpt.UnsafeCheckpointError, match="same root"):
        shardckpt.save(state, str(tmp_path / "two" / "b"), base=str(tmp_path / "one" / "a"))
    assert not (tmp_path / "two" / "b").exists()


def test_missing_or_corrupt_referenced_chunk_names_both_checkpoints(tmp_path):
    state = _state(torch.Generator().manual_seed(6))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shardckpt.save(state, a, chunk_bytes=CHUNK, codec="raw", content_hashes=True)
    shardckpt.save(state, b, chunk_bytes=CHUNK, base="a")
    m = _manifest(b)
    ref = next(f for f in m.files if f.base == "a")
    target = os.path.join(a, ref.path)
    with open(target, "r+b") as fh:  # flip one stored byte of a referenced chunk
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    for call in (shardckpt.load_full, shardckpt.verify):
        with pytest.raises(shardckpt.CorruptCheckpointError,
                           match=r"stored by checkpoint 'a', referenced by 'b'"):
            call(b)
    problems = shardckpt.verify(b, collect=True).problems
    assert problems and all("referenced by 'b'" in str(p) for p in problems)
    os.unlink(target)
    with pytest.raises(shardckpt.CorruptCheckpointError, match="missing.*a/data"):
        shardckpt.load_full(b)


def test_own_base_and_replacing_a_referenced_checkpoint_are_refused(tmp_path):
    state = _state(torch.Generator().manual_seed(7))
    a = str(tmp_path / "a")
    shardckpt.save(state, a, content_hashes=True)
    with pytest.raises(ValueError, match="own base"):
        shardckpt.save(state, a, base="a", overwrite=True)
    shardckpt.save(state, str(tmp_path / "b"), base="a")
    with pytest.raises(shardckpt.CheckpointExistsError, match="reference its data"):
        shardckpt.save(state, a, overwrite=True)
    assert_same(state, shardckpt.load_full(str(tmp_path / "b")))


def test_a_base_without_hashes_references_nothing(tmp_path):
    state = _state(torch.Generator().manual_seed(8))
    shardckpt.save(state, str(tmp_path / "a"))
    info = shardckpt.save(state, str(tmp_path / "b"), base="a")
    assert info.stats["chunks_reused"] == 0 and info.stored_bytes > 0
    assert all(f.base is None for f in _manifest(str(tmp_path / "b")).files)
    s = open_storage(str(tmp_path))
    assert s.exists("b/manifest.json")


def test_equal_chunks_never_reference_the_same_stored_bytes_twice(tmp_path):
    gen = torch.Generator().manual_seed(9)
    state = {"a": torch.zeros(1024), "b": torch.randn(1024, generator=gen)}
    shardckpt.save(state, str(tmp_path / "a"), chunk_bytes=CHUNK, content_hashes=True)
    state["b"] = torch.zeros(1024)  # now equal to "a": two chunks, one stored copy
    shardckpt.save(state, str(tmp_path / "b"), chunk_bytes=CHUNK, base="a")
    m = _manifest(str(tmp_path / "b"))
    rows = [(m.files[int(r[0])], int(r[1])) for t in m.tensors.values() for r in t.chunks]
    assert len(set(rows)) == len(rows)  # no two rows name the same bytes
    assert sum(f.base == "a" for f, _ in rows) == 1
    assert any(f.path.endswith(".x.bin") for f, _ in rows)
    assert_same(state, shardckpt.load_full(str(tmp_path / "b")))
    assert shardckpt.verify(str(tmp_path / "b")).ok


def test_incremental_saves_and_retention_on_s3(s3_url):
    """S3 (moto): references, verify, and the manager retiring a referenced base without a
    rename; every kept step still loads."""
    url, opts = s3_url
    state = _state(torch.Generator().manual_seed(3))
    mgr = shardckpt.CheckpointManager(url, every_n_steps=1, keep_last=1, incremental=True,
                                      async_save=False, handle_preemption=False,
                                      storage_options=opts, save_options={"chunk_bytes": CHUNK})
    heads = {}
    for step in (1, 2, 3):
        state["model"]["head"] += 1  # only the head changes: the embedding is referenced
        heads[step] = state["model"]["head"].clone()
        mgr.maybe_save(step, state)
    mgr.close()
    assert mgr.steps() == [3]
    m = open_manifest(*open_checkpoint(mgr.path(3), opts))
    assert any(f.base for f in m.files)  # the embedding still lives in an older folder
    loaded = shardckpt.load_full(mgr.path(3), storage_options=opts)
    assert torch.equal(loaded["model"]["head"], heads[3])
    assert torch.equal(loaded["model"]["embed"], state["model"]["embed"])
    assert shardckpt.verify(mgr.path(3), collect=True, storage_options=opts).ok
