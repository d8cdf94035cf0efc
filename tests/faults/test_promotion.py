"""Issue 25, case 7: the local tier never commits bytes it has not checked.

Promotion (``promote_local=True``) copies a committed local checkpoint into the durable tier.
A local data file damaged after the local commit (one flipped byte, a cut tail) used to be
copied as it was: the durable step could not load, ``keep_last=1`` then removed the last good
one, and once the local tier was gone ``restore`` found nothing. Now the promotion fails, the
manager saves the state instead, and the newest durable step loads. A replica peer that sends
wrong bytes fails the local save on every rank instead of committing them.
"""

import json
import os
import shutil
import tempfile
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import shardckpt
from shardckpt.manage.tier import local as tiers
from shardckpt.testing import run_with_ranks


def _state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(3000, generator=gen), "b": torch.arange(500) * step,
            "step": step}


def _manager(root, local, **kw):
    kw = {"every_n_steps": 2, "local_every_n_steps": 1, "async_save": False,
          "handle_preemption": False, "local_on_busy": "wait", "promote_local": True,
          "keep_last": 1, **kw}
    return shardckpt.CheckpointManager(root, local_dir=local, **kw)


def damage(path: str, kind: str, where: float, n: int) -> None:
    """Flip one byte at the fraction ``where`` of the file, or cut ``n`` bytes off its end."""
    size = os.path.getsize(path)
    if kind == "cut":
        os.truncate(path, max(size - n, 0))
        return
    with open(path, "r+b") as f:
        f.seek(min(int(where * size), size - 1))
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def _largest(folder: str) -> str:
    data = os.path.join(folder, "data")
    return max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["flip", "cut"]), where=st.floats(0, 1), n=st.integers(1, 64))
def test_a_local_file_damaged_before_promotion_is_never_committed(kind, where, n):
    real = tiers.LocalTier.promote

    def promote(self, step, storage, name):
        if step == 4:  # after the local commit of step 4, before its promotion
            damage(_largest(self.path(step)), kind, where, n)
        return real(self, step, storage, name)

    with tempfile.TemporaryDirectory() as tmp:
        root, local = os.path.join(tmp, "durable"), os.path.join(tmp, "local")
        with mock.patch.object(tiers.LocalTier, "promote", promote), \
                warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            with _manager(root, local) as m:
                for step in range(1, 5):
                    m.maybe_save(step, _state(step))
        assert m.steps() == [4]  # keep_last=1 removed step 2
        shardckpt.verify(os.path.join(root, "step-00000004"))  # whatever was committed loads
        shutil.rmtree(local)  # the node is gone: only the durable tier is left
        target = _state(0)
        with _manager(root, local) as m:
            assert m.restore(target) == 4
        want = _state(4)
        assert target["step"] == 4 and torch.equal(target["w"], want["w"]) and \
            torch.equal(target["b"], want["b"])


def test_a_cut_local_file_fails_the_promotion_and_the_state_is_saved(tmp_path):
    """The same fault, deterministic, with what the manager says about it."""
    real = tiers.LocalTier.promote

    def promote(self, step, storage, name):
        damage(_largest(self.path(step)), "cut", 0, 7)
        return real(self, step, storage, name)

    root, local = tmp_path / "durable", tmp_path / "local"
    with mock.patch.object(tiers.LocalTier, "promote", promote), \
            pytest.warns(UserWarning, match="promoting local step 2 failed.*7 bytes|"
                                            "promoting local step 2 failed.*truncated"):
        with _manager(root, local) as m:
            m.maybe_save(1, _state(1))
            m.maybe_save(2, _state(2))
    with open(root / "step-00000002" / "manifest.json") as f:
        assert json.load(f)["metadata"]["shardckpt.manager"]["reason"] == "periodic"
    assert sorted(os.listdir(root)) == [".manager-history.json", ".manager.json",
                                        ".shardckpt-job", "latest", "step-00000002"]  # no debris
    shardckpt.verify(root / "step-00000002")


# ---------------------------------------------------------------- 2 nodes x 2 ranks

def _env(rank: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_WORLD_SIZE="2", SHARDCKPT_DIST_TIMEOUT="20")
    os.environ.pop("GROUP_RANK", None)


def _dist_state(world: int, step: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    w = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8) + step
    return {"w": distribute_tensor(w, mesh, [Shard(0)]), "step": step}


def _save_damaging(rank, world, root, local, fault):
    """Steps 1-4, durable every 2 steps by promotion; ``fault`` on rank 2 at step 4:
    ``promote`` damages its own local file before promoting, ``replica`` flips a byte of the
    replica it receives."""
    _env(rank)
    from shardckpt.dist import transfer as tier_transfer
    m = _manager(root, f"{local}/node-{{node}}", keep_last=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in range(1, 5):
            if step == 4 and rank == 2 and fault == "promote":
                real = tiers.LocalTier.promote

                def promote(self, s, storage, name, real=real):
                    damage(os.path.join(self.path(s), "data", "rank-00002.bin"), "flip", 0.5,
                           0)
                    return real(self, s, storage, name)
                tiers.LocalTier.promote = promote
            if step == 4 and rank == 2 and fault == "replica":
                m._tier.wait()  # step 3's replicas are not to be touched
                real_put = tier_transfer._Writers.put

                def put(self, rel, data, real_put=real_put):
                    data = data.clone()
                    data[len(data) // 2] ^= 0xFF
                    real_put(self, rel, data)
                tier_transfer._Writers.put = put
            m.maybe_save(step, _dist_state(world, step))
        m.close()
    return {"durable": m.steps(), "local": m._tier.last_committed,
            "warnings": [str(w.message) for w in seen if "shardckpt" in str(w.message)]}


def _restore(rank, world, root, local):
    _env(rank)
    m = _manager(root, f"{local}/node-{{node}}")
    target = _dist_state(world, 0)
    step = m.restore(target)
    return {"step": step, "w": target["w"].full_tensor(), "target_step": target["step"]}


def _committed(local, node):
    folder = os.path.join(local, f"node-{node}")
    return sorted(n for n in os.listdir(folder)
                  if os.path.exists(os.path.join(folder, n, "manifest.json")))


def test_one_nodes_damaged_file_fails_the_promotion_on_every_rank(tmp_path):
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    results = run_with_ranks(4, _save_damaging, root, local, "promote", timeout=120)
    for res in results:
        assert res.value["durable"] == [4]
        assert any("promoting local step 4 failed" in w for w in res.value["warnings"]), \
            res.value["warnings"]
    said = " ".join(results[2].value["warnings"])
    assert "rank-00002.bin" in said, said
    shardckpt.verify(os.path.join(root, "step-00000004"))
    for node in (0, 1):
        shutil.rmtree(os.path.join(local, f"node-{node}"))
    for res in run_with_ranks(4, _restore, root, local, timeout=120):
        assert res.value["step"] == 4 and res.value["target_step"] == 4
        assert torch.equal(res.value["w"], _dist_state_full(4))


def _dist_state_full(step: int) -> torch.Tensor:
    return torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8) + step


def test_a_replica_received_with_wrong_bytes_fails_the_local_save(tmp_path):
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    results = run_with_ranks(4, _save_damaging, root, local, "replica", timeout=120)
    for res in results:
        assert any("local save of step 4" in w for w in res.value["warnings"]), \
            res.value["warnings"]
        assert res.value["local"] == 3
        assert res.value["durable"] == [4]  # saved from the state, not promoted
    said = " ".join(w for res in results for w in res.value["warnings"])
    assert "checksum mismatch" in said, said
    for node in (0, 1):  # nothing committed anywhere; step 3 is still whole
        assert _committed(local, node) == ["step-00000003"]
        shardckpt.verify(os.path.join(local, f"node-{node}", "step-00000003"))
