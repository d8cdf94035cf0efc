"""Issue 25, case 15: another local user must not be able to block a shared load by creating
its /dev/shm folder first. Names were ``shardckpt-share-<uid>-<pid>-<n>``, all public (pids are
in /proc, ``n`` counts loads from 1); now the leader draws a random token, makes the folder with
an exclusive ``mkdir`` (drawing again if the name exists) and tells its node's ranks the token.
"""

import os

import pytest
import torch

import shardckpt
from shardckpt.dist import nodeshm
from shardckpt.errors import StorageError
from shardckpt.testing import run_with_ranks

STRANGER = 65534  # "nobody": the other local user


def plant(base: str, name: str) -> str:
    """A folder as another user would leave it: theirs, and open to them only."""
    path = os.path.join(base, name)
    os.mkdir(path, 0o755)
    if os.getuid() == 0:
        os.chown(path, STRANGER, STRANGER)
    return path


def old_names(pid: int, loads: int = 32) -> list[str]:
    """Every name the former scheme gave a leader ``pid``'s first ``loads`` loads."""
    return [f"{nodeshm.PREFIX}{os.getuid()}-{pid}-{n}" for n in range(1, loads + 1)]


def test_names_are_unpredictable(tmp_path, monkeypatch):
    monkeypatch.setattr(nodeshm, "base_dir", lambda: str(tmp_path))
    made = [nodeshm.NodeFolder.create(os.getpid()) for _ in range(20)]
    names = {os.path.basename(f.path) for f in made}
    assert len(names) == 20  # a fresh name every load
    assert not names & set(old_names(os.getpid(), 1000))
    tokens = [f.token for f in made]
    assert all(0 < t < 1 << 63 for t in tokens) and len(set(tokens)) == 20
    assert max(t.bit_length() for t in tokens) >= 55  # 63 random bits (2^-20 to fail by luck)
    for f in made:
        assert os.stat(f.path).st_mode & 0o777 == 0o700
        assert nodeshm.NodeFolder.attach(os.getpid(), f.token).path == f.path
        f.remove()


def test_a_planted_name_is_never_adopted(tmp_path, monkeypatch):
    """Exclusive creation: a name that exists (planted, or a 2^-63 collision) is skipped and a
    fresh token drawn; the planted folder is left as it was."""
    monkeypatch.setattr(nodeshm, "base_dir", lambda: str(tmp_path))
    draws = iter([5, 5, 9])
    monkeypatch.setattr(nodeshm, "new_token", lambda: next(draws))
    planted = plant(str(tmp_path), nodeshm.folder_name(os.getpid(), 5))
    folder = nodeshm.NodeFolder.create(os.getpid())
    assert folder.token == 9 and folder.path == os.path.join(tmp_path, nodeshm.folder_name(
        os.getpid(), 9))
    assert os.stat(planted).st_mode & 0o777 == 0o755 and os.listdir(planted) == []


def test_when_every_name_is_taken_the_error_is_typed(tmp_path, monkeypatch):
    monkeypatch.setattr(nodeshm, "base_dir", lambda: str(tmp_path))
    monkeypatch.setattr(nodeshm, "new_token", lambda: 5)
    plant(str(tmp_path), nodeshm.folder_name(os.getpid(), 5))
    with pytest.raises(StorageError, match="fresh random names all existed"):
        nodeshm.NodeFolder.create(os.getpid())


def _state(zeros: bool = False) -> dict:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=gen)
    return {"w": torch.zeros_like(w) if zeros else w, "step": 4}


def _load_with_planted_names(rank, world, path):
    """Rank 0 leads the node: a stranger who read its pid from /proc has taken every name the
    old scheme would give its loads. The shared load must still work, twice."""
    os.environ["SHARDCKPT_SHARE_READS"] = "1"
    planted = []
    if rank == 0:
        planted = [plant(nodeshm.base_dir(), n) for n in old_names(os.getpid())]
    torch.distributed.barrier()
    try:
        for _ in range(2):
            state = _state(zeros=True)
            shardckpt.load(state, path, timeout=60)
            assert torch.equal(state["w"], _state()["w"])
    finally:
        torch.distributed.barrier()
        for p in planted:
            os.rmdir(p)
    return os.getpid()


def test_shared_loads_work_while_the_old_names_are_taken(tmp_path):
    path = tmp_path / "ckpt"
    shardckpt.save(_state(), path)
    pids = [r.value for r in run_with_ranks(2, _load_with_planted_names, str(path),
                                            timeout=180)]
    mine = f"{nodeshm.PREFIX}{os.getuid()}-"
    left = [n for n in os.listdir(nodeshm.base_dir())
            if n.startswith(mine) and n[len(mine):].split("-")[0] in {str(p) for p in pids}]
    assert left == []  # the loads removed their own folders; the planted ones the test did
