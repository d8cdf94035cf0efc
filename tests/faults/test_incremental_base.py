"""Issue 25 case 2: incremental saves over a damaged base. A managed incremental save must never
commit a reference to bytes that are missing, short or corrupt: it writes such chunks again
from the live state, so the newest checkpoint loads bit-exactly and ``restore`` returns it."""

import os
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import shardckpt
from shardckpt.save import incremental
from shardckpt.format.opening import open_manifest
from shardckpt.storage import open_checkpoint
from shardckpt.testing.faults import flip_byte, truncate
from tests.helpers import assert_same

CHUNK = 1024  # bytes: every tensor spans several chunks


def state(step: int) -> dict:
    """``frozen`` never changes, ``slow`` changes at step 2 only, ``fast`` at every step: the
    checkpoint of step 3 references both step 1's files (frozen) and step 2's own (slow)."""
    gen = torch.Generator().manual_seed(11)
    return {"frozen": torch.randn(2048, generator=gen),
            "slow": torch.randn(1024, generator=gen) + (1.0 if step >= 2 else 0.0),
            "fast": torch.arange(512, dtype=torch.float64) * step,
            "step": step}


def manager(root, **kw) -> shardckpt.CheckpointManager:
    return shardckpt.CheckpointManager(str(root), every_n_steps=1, incremental=True,
                                       async_save=False, handle_preemption=False,
                                       save_options={"chunk_bytes": CHUNK, "codec": "zstd"}, **kw)


def manifest(root, step: int):
    return open_manifest(*open_checkpoint(os.path.join(str(root), f"step-{step:08d}")))


def target_of(root, which: str) -> str:
    """The file of step 2 that the save of step 3 would reference: a data file step 2 stores
    itself (``own``), one it references in step 1 (``referenced``), or its manifest."""
    step2 = os.path.join(str(root), "step-00000002")
    if which == "manifest":
        return os.path.join(step2, "manifest.json")
    m = manifest(root, 2)
    f = next(f for f in m.files if (f.base is None) == (which == "own"))
    return os.path.join(str(root), f.base or "step-00000002", f.path)


def damage(path: str, how: str, offset: int = -1) -> None:
    size = os.path.getsize(path)
    if how == "flip":
        flip_byte(path, offset % size if offset >= 0 else size // 2, 0x10)
    elif how == "truncate":
        truncate(path, 7)
    else:
        os.unlink(path)


def restored(root) -> tuple[int | None, dict]:
    into = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0
            for k, v in state(1).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the damaged older checkpoints are skipped
        mgr = manager(root)
        step = mgr.restore(into)
        mgr.close()
    return step, into


def run(root, which: str, how: str, offset: int = -1, damage_after: int = 2,
        last: int = 4) -> None:
    """Save steps 1..``last``, damaging step 2's ``which`` file after step ``damage_after``."""
    mgr = manager(root)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in range(1, last + 1):
            mgr.maybe_save(step, state(step))
            if step == damage_after:
                damage(target_of(root, which), how, offset)
    mgr.close()
    return seen


@pytest.mark.parametrize("which,how", [(w, h) for w in ("own", "referenced", "manifest")
                                       for h in ("flip", "truncate", "delete")
                                       if (w, h) != ("manifest", "delete")])  # no base at all
def test_saves_over_a_damaged_base_heal_and_the_latest_restores(tmp_path, which, how):
    seen = run(tmp_path, which, how)
    assert any("damaged" in str(w.message) for w in seen)
    step, into = restored(tmp_path)
    assert step == 4
    assert_same(state(4), into)
    assert shardckpt.verify(os.path.join(str(tmp_path), "step-00000004")).ok
    assert shardckpt.verify(os.path.join(str(tmp_path), "step-00000003")).ok


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_damage_after_a_chunk_was_checked_is_found_again(tmp_path, how):
    """Step 3's save checks step 1's chunks; they are damaged afterwards: step 4's save must
    not trust what it checked before (the file's identity changed)."""
    run(tmp_path, "referenced", how, damage_after=3)
    step, into = restored(tmp_path)
    assert step == 4
    assert_same(state(4), into)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["own", "referenced", "manifest"]),
       offset=st.integers(0, 1 << 20), damage_after=st.sampled_from([2, 3]))
def test_a_bit_flipped_anywhere_in_a_base_file_never_reaches_the_newest(which, offset,
                                                                        damage_after):
    with tempfile.TemporaryDirectory() as root:
        run(root, which, "flip", offset, damage_after)
        step, into = restored(root)
        assert step == 4
        assert_same(state(4), into)


def test_each_referenced_chunk_is_read_once_per_process(tmp_path, monkeypatch):
    """The check costs a read of the referenced bytes the first time only."""
    reads = []
    real = incremental._stored
    monkeypatch.setattr(incremental, "_stored",
                        lambda s, src, off, n: reads.append((src, off)) or real(s, src, off, n))
    mgr = manager(tmp_path)
    mgr.maybe_save(1, state(1))
    mgr.maybe_save(2, state(2))
    first = len(reads)
    mgr.maybe_save(3, state(3))  # frozen: checked already; slow: step 2's own, new
    second = len(reads) - first
    mgr.maybe_save(4, state(4))
    mgr.close()
    assert first > 0 and len(set(reads)) == len(reads)
    assert second == len(manifest(tmp_path, 3).tensors["slow"].chunks)
    assert len(reads) == first + second


def test_a_full_save_every_n_bounds_what_undetected_rot_takes(tmp_path, monkeypatch):
    """Rot the check cannot see (as if it came after the check, identity unchanged) breaks the
    incremental checkpoints that reference it, never the next full save."""
    monkeypatch.setattr(incremental.BaseFiles, "chunk_ok", lambda self, row: True)
    mgr = manager(tmp_path, full_every=3)
    for step in range(1, 4):
        mgr.maybe_save(step, state(step))
    damage(target_of(tmp_path, "referenced"), "truncate")  # step 1: only full save so far
    for step in range(4, 6):
        mgr.maybe_save(step, state(step))
    mgr.close()
    chains = [manifest(tmp_path, s).metadata["shardckpt.manager"]["chain"] for s in range(1, 6)]
    assert chains == [0, 1, 2, 0, 1]
    assert all(f.base is None for f in manifest(tmp_path, 4).files)
    step, into = restored(tmp_path)
    assert step == 5
    assert_same(state(5), into)


def test_restore_gives_none_only_when_nothing_loads(tmp_path):
    """Damage found after the last save: restore skips every checkpoint that references it and
    returns the newest one that loads; with everything damaged, None."""
    mgr = manager(tmp_path, full_every=3)
    for step in range(1, 6):
        mgr.maybe_save(step, state(step))
    mgr.close()
    step4 = os.path.join(str(tmp_path), "step-00000004", "data")
    for f in os.listdir(step4):  # the full save of step 4, which step 5 references
        truncate(os.path.join(step4, f), 3)
    assert restored(tmp_path)[0] == 3
    for step in (1, 2, 3):
        os.unlink(os.path.join(str(tmp_path), f"step-{step:08d}", "manifest.json"))
    assert restored(tmp_path)[0] is None


def _ranks_heal(rank, world, root, which):
    import torch.distributed as dist
    mgr = manager(root)
    for step in range(1, 5):
        mgr.maybe_save(step, state(step))
        if step == 2:
            if rank == 0:  # every data file of that kind, whichever rank wrote it
                m = manifest(root, 2)
                for f in m.files:
                    if (f.base is None) == (which == "own"):
                        damage(os.path.join(root, f.base or "step-00000002", f.path), "flip")
            dist.barrier()
    mgr.close()
    step, into = restored(root)
    assert_same(state(4), into)
    return step


@pytest.mark.parametrize("which", ["own", "referenced"])
def test_two_ranks_heal_a_damaged_base(tmp_path, which):
    from shardckpt.testing.ranks import run_with_ranks
    steps = [r.value for r in run_with_ranks(2, _ranks_heal, str(tmp_path), which)]
    assert steps == [4, 4]


def test_an_object_rewritten_in_place_is_checked_again(memory_url):
    """On an object store the identity is URL, size and modification time: a same-size
    rewrite of a chunk checked by the save before is found."""
    import fsspec
    fs = fsspec.filesystem("memory")
    mgr = manager(memory_url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, 5):
            mgr.maybe_save(step, state(step))
            if step == 2:  # step 2's save checked these chunks of step 1
                m = open_manifest(*open_checkpoint(mgr.path(2)))
                f = next(f for f in m.files if f.base)
                obj = memory_url.replace("memory://", "/") + f"/{f.base}/{f.path}"
                data = bytearray(fs.cat(obj))
                data[len(data) // 2] ^= 0x10
                fs.pipe(obj, bytes(data))
        into = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0
                for k, v in state(1).items()}
        assert mgr.restore(into) == 4
    mgr.close()
    assert_same(state(4), into)
