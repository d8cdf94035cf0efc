"""Issue 25 case 11: one manager holds a root at a time. A second one (another job pointed at the
same root) fails with RootLeaseError naming the holder, before it writes or deletes anything; a
holder killed with -9 does not keep the root (same host: its pid is gone; elsewhere: the lease
expires); a holder that lost its lease stops instead of deleting the new holder's checkpoints;
the ranks of one distributed job share the lease through rank 0."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from shardckpt import errors
from shardckpt.manage.manager import CheckpointManager, step_name
from shardckpt.testing.ranks import run_with_ranks

LEASE_NAME = ".lease.json"  # shardckpt.manage.lease.LEASE_NAME


def _mgr(root, **kw):
    return CheckpointManager(root, async_save=False, handle_preemption=False, **kw)


def _holder(root) -> subprocess.Popen:
    """Another process holding ``root`` (prints 'ready' once it does)."""
    code = textwrap.dedent(f"""
        import sys, time
        from shardckpt.manage.manager import CheckpointManager
        mgr = CheckpointManager({str(root)!r}, handle_preemption=False)
        print("ready", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_second_job_is_refused_naming_the_holder_then_takes_over_after_kill_9(tmp_path):
    holder = _holder(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(errors.RootLeaseError) as info:
            _mgr(tmp_path)
        assert time.monotonic() - t0 < 5  # a live holder on this host: refused at once
        assert f"pid {holder.pid}" in str(info.value) and socket.gethostname() in str(info.value)
        assert info.value.holder["pid"] == holder.pid
        assert not [n for n in os.listdir(tmp_path) if n.startswith("step-")]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    t0 = time.monotonic()
    with _mgr(tmp_path) as mgr:  # the dead holder's pid is gone: taken over at once
        assert time.monotonic() - t0 < 5
        mgr.save(1, {"w": torch.ones(3)})
        assert json.loads((tmp_path / LEASE_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LEASE_NAME).exists()  # released on close


def test_two_managers_in_one_process_and_release_on_close(tmp_path):
    first = _mgr(tmp_path)
    with pytest.raises(errors.RootLeaseError, match="another CheckpointManager"):
        _mgr(tmp_path)
    first.close()
    with _mgr(tmp_path) as second:
        second.save(1, {"w": torch.ones(2)})


def _foreign(root, expires_in: float, owner="other-job") -> dict:
    record = {"format": 1, "owner": owner, "host": "elsewhere", "boot": "x", "pidns": "y",
              "pid": 4242, "renewed": time.time(), "expires": time.time() + expires_in}
    (root / LEASE_NAME).write_text(json.dumps(record))
    return record


def test_expired_lease_of_another_host_is_taken_over(tmp_path):
    _foreign(tmp_path, expires_in=-1)
    with _mgr(tmp_path) as mgr:
        record = json.loads((tmp_path / LEASE_NAME).read_text())
        assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
        assert record["expires"] > time.time()
        mgr.save(1, {"w": torch.ones(2)})


def test_a_lease_renewed_elsewhere_refuses_and_one_left_to_expire_is_taken(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("SHARDCKPT_LEASE_SECONDS", "1.5")
    stop = threading.Event()

    def renew():  # a live holder on another host
        while not stop.wait(0.2):
            _foreign(tmp_path, expires_in=1.5)
    _foreign(tmp_path, expires_in=1.5)
    worker = threading.Thread(target=renew)
    worker.start()
    try:
        with pytest.raises(errors.RootLeaseError, match="host 'elsewhere'"):
            _mgr(tmp_path)
    finally:
        stop.set()
        worker.join()
    t0 = time.monotonic()
    with _mgr(tmp_path):  # the holder stopped renewing (crashed): its lease expires
        assert time.monotonic() - t0 < 5


def test_a_holder_that_lost_the_root_stops_and_deletes_nothing(tmp_path):
    with _mgr(tmp_path, keep_last=1) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
        _foreign(tmp_path, expires_in=60, owner="new-job")  # it stalled; another job took over
        with pytest.raises(errors.RootLeaseError, match="no longer holds"):
            mgr.save(2, {"w": torch.ones(2)})
        assert not (tmp_path / step_name(2)).exists()
        assert (tmp_path / step_name(1) / "manifest.json").exists()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["owner"] == "new-job"  # not ours


def test_object_store_root(memory_url):
    with _mgr(memory_url) as mgr:
        with pytest.raises(errors.RootLeaseError):
            _mgr(memory_url)
        mgr.save(1, {"w": torch.ones(2)})
    with _mgr(memory_url) as again:
        assert again.steps() == [1]


def _job(rank, world, root):
    from shardckpt.manage.manager import CheckpointManager
    import torch
    try:
        with CheckpointManager(root, async_save=False, handle_preemption=False) as mgr:
            mgr.save(1, {"w": torch.full((4,), float(rank))})
            return "saved", mgr.steps()
    except errors.RootLeaseError as exc:
        return "refused", str(exc)


def test_ranks_of_one_job_share_rank_0s_lease_and_a_second_job_is_refused_on_every_rank(
        tmp_path):
    root = str(tmp_path / "root")
    results = run_with_ranks(2, _job, root)
    assert [r.value for r in results] == [("saved", [1]), ("saved", [1])]
    os.makedirs(root, exist_ok=True)
    holder = _holder(root)
    try:
        results = run_with_ranks(2, _job, root)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert all(r.value[0] == "refused" for r in results), results
    assert f"pid {holder.pid}" in results[0].value[1]


def _job_loses_root(rank, world, root):
    import json
    import time
    from shardckpt.manage.manager import CheckpointManager
    import torch
    with CheckpointManager(root, async_save=False, handle_preemption=False) as mgr:
        mgr.save(1, {"w": torch.full((4,), float(rank))})
        if rank == 0:  # another job took the root while this one stalled
            with open(f"{root}/{LEASE_NAME}", "w") as f:
                json.dump({"owner": "new-job", "host": "elsewhere", "pid": 1,
                           "renewed": time.time(), "expires": time.time() + 60}, f)
        try:
            mgr.save(2, {"w": torch.full((4,), float(rank))})
            return "saved"
        except errors.RootLeaseError as exc:
            return f"refused: {exc}"


def test_every_rank_stops_when_rank_0_loses_the_root(tmp_path):
    root = str(tmp_path / "root")
    results = run_with_ranks(2, _job_loses_root, root)
    assert all(r.value.startswith("refused") for r in results), results
    assert not os.path.exists(os.path.join(root, step_name(2)))


def test_disk_full_while_creating_the_lease_leaves_no_empty_lease(tmp_path, monkeypatch):
    """The create succeeds and the write runs out of space: DiskFullError, and no empty lease
    file is left to block the next manager until it ages out."""
    import errno as errno_mod

    from shardckpt import storage as storage_mod
    from shardckpt.storage.wrapper import StorageWrapper

    class FullOnLease(StorageWrapper):
        def write(self, path, data, durable=True, exclusive=True):
            if path == LEASE_NAME:
                super().write(path, b"", durable, exclusive)  # the inode, not the bytes
                raise OSError(errno_mod.ENOSPC, "No space left on device")
            return super().write(path, data, durable, exclusive)

    monkeypatch.setattr(storage_mod, "WRAPPERS", [FullOnLease])
    with pytest.raises(errors.DiskFullError, match=r"\.lease\.json"):
        _mgr(tmp_path)
    assert not (tmp_path / LEASE_NAME).exists()
    monkeypatch.setattr(storage_mod, "WRAPPERS", [])
    t0 = time.monotonic()
    with _mgr(tmp_path):
        assert time.monotonic() - t0 < 5
