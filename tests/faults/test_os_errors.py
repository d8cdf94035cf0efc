"""Issue 25 case 5: a checkpoint the OS will not let us read gives a typed error that is also
the stdlib type (NotADirectoryError, PermissionError, OSError for a link loop) naming the file;
``restore`` goes back to an older checkpoint; ``ls``, ``gc`` and ``cleanup`` report an unreadable
folder and go on; and such a folder is never called "never committed".

Mode-000 cases need a reader that is not root: as root each runs in a child under
``setpriv --reuid=nobody``; they skip, saying why, where that is impossible.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

import shardckpt
from shardckpt import errors
from shardckpt.errors import CheckpointError
from shardckpt.manage.manager import CheckpointManager, step_name
from tests.helpers import assert_same

from .conftest import small_state

READERS = {"load": lambda p: shardckpt.load(small_state(), p),
           "load_full": shardckpt.load_full, "verify": shardckpt.verify,
           "verify_collect": lambda p: shardckpt.verify(p, collect=True)}


def _data_as_file(path):
    shutil.rmtree(path / "data")
    (path / "data").write_bytes(b"not a folder")


def _data_loop(path):
    shutil.rmtree(path / "data")
    os.symlink("data", path / "data")  # data -> data: ELOOP


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("damage, stdlib, code", [
    (_data_as_file, NotADirectoryError, errno.ENOTDIR), (_data_loop, OSError, errno.ELOOP)])
def test_broken_data_folder_is_a_typed_error_naming_the_file(saved, reader, damage, stdlib,
                                                             code):
    path, _ = saved
    names = os.listdir(path / "data")
    damage(path)
    with pytest.raises(CheckpointError) as info:
        out = READERS[reader](path)
        if reader == "verify_collect":  # collect mode lists file faults instead of raising
            assert out.problems
            raise out.problems[0]
    assert isinstance(info.value, stdlib) and info.value.errno == code
    assert any(f"data/{n}" in str(info.value) for n in names), str(info.value)


def test_reference_whose_base_is_a_regular_file(tmp_path):
    """An incremental checkpoint whose base folder became a regular file (as a manifest edited
    to name the manager's ``latest`` would): NotADirectoryError, typed, naming the file."""
    root = tmp_path / "root"
    state = small_state()
    shardckpt.save(state, root / "step-1", codec="zstd", content_hashes=True)
    shardckpt.save(state, root / "step-2", codec="zstd", content_hashes=True, base="step-1")
    shutil.rmtree(root / "step-1")
    (root / "step-1").write_text("step-00000002\n")
    for reader in ("load", "load_full", "verify"):
        with pytest.raises(CheckpointError, match="step-1/data") as info:
            READERS[reader](root / "step-2")
        assert isinstance(info.value, NotADirectoryError)


def test_restore_skips_a_broken_newest_checkpoint_and_says_why(tmp_path, caplog):
    with CheckpointManager(tmp_path, async_save=False, handle_preemption=False) as mgr:
        for step in (1, 2):
            mgr.save(step, small_state(step))
    _data_as_file(tmp_path / step_name(2))
    target = small_state(5)
    with CheckpointManager(tmp_path, async_save=False, handle_preemption=False) as mgr, \
            pytest.warns(UserWarning, match="skipping .*step-00000002.*NotADirectory"):
        assert mgr.restore(target) == 1
    assert_same(target, small_state(1))
    assert any("step-00000002" in r.getMessage() for r in caplog.records)


def test_restore_returns_none_only_when_nothing_loads(tmp_path):
    with CheckpointManager(tmp_path, async_save=False, handle_preemption=False) as mgr:
        mgr.save(1, small_state(1))
        _data_loop(tmp_path / step_name(1))
        with pytest.warns(UserWarning, match="skipping"):
            assert mgr.restore(small_state()) is None


# ---------------------------------------------------------------- a reader that is not root
def _run_unprivileged(code: str) -> dict:
    """Run ``code`` (which prints one JSON line last) as a user without root's override."""
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root and setpriv is missing: mode 000 cannot be tested")
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] + argv
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/tmp",
                          env=env)
    if done.returncode != 0 or not done.stdout.strip():
        pytest.fail(f"child failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def shared_dir():
    """A folder another user may enter (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="shardckpt-oserr-")
    os.chmod(path, 0o777)
    try:
        yield path
    finally:
        for dirpath, dirs, files in os.walk(path):
            for n in dirs:
                os.chmod(os.path.join(dirpath, n), 0o755)
        shutil.rmtree(path, ignore_errors=True)


_TRY_READERS = """
    import json, sys, shardckpt
    out = {}
    for name, call in (("load_full", shardckpt.load_full), ("verify", shardckpt.verify)):
        try:
            call(sys.argv[1] if len(sys.argv) > 1 else PATH)
            out[name] = ["ok", "", 0, False, False]
        except Exception as exc:
            out[name] = [type(exc).__name__, str(exc), getattr(exc, "errno", 0) or 0,
                         isinstance(exc, shardckpt.CheckpointError),
                         isinstance(exc, PermissionError)]
    print(json.dumps(out))
"""


@pytest.mark.parametrize("what", ["data file", "data folder", "manifest", "checkpoint folder"])
def test_mode_000_gives_permission_error_naming_the_file(shared_dir, what):
    path = os.path.join(shared_dir, "ckpt")
    shardckpt.save(small_state(), path, codec="zstd", chunk_bytes=256)
    target = {"data file": os.path.join(path, "data", sorted(os.listdir(f"{path}/data"))[0]),
              "data folder": os.path.join(path, "data"),
              "manifest": os.path.join(path, "manifest.json"),
              "checkpoint folder": path}[what]
    os.chmod(target, 0)
    got = _run_unprivileged(_TRY_READERS.replace("PATH", repr(path)))
    for reader, (kind, message, code, typed, is_permission) in got.items():
        assert typed and is_permission and code == errno.EACCES, (reader, kind, message)
        assert kind == errors.StoragePermissionError.__name__
        assert "never committed" not in message
        assert os.path.basename(target) in message or target in message, message


_MANAGER_ROOT = """
    import json, warnings, shardckpt
    from shardckpt.manage.manager import CheckpointManager
    from shardckpt.manage.layout import collect_garbage
    from shardckpt.storage import open_storage
    from shardckpt import cli
    out = {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with CheckpointManager(ROOT, async_save=False, handle_preemption=False) as mgr:
            state = {"w": shardckpt.load_full(ROOT + "/step-00000001")["w"] * 0}
            out["restore"] = mgr.restore(state)
            out["cleanup"] = [(r["name"], r.get("reason")) for r in mgr.cleanup(older_than=0,
                                                                               dry_run=True)]
    out["warnings"] = [str(w.message) for w in seen]
    import io, contextlib
    for cmd in (["ls", ROOT, "--json"], ["gc", ROOT, "--older-than", "0s", "--json"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                status = cli.main(cmd)
            except BaseException as exc:
                status = f"{type(exc).__name__}: {exc}"
        out[cmd[0]] = [status, buf.getvalue()]
    print(json.dumps(out))
"""


def test_manager_root_with_an_unreadable_folder(shared_dir):
    """restore goes back past it; ls lists it as unreadable; gc and cleanup keep it, say why,
    and still collect the other leftovers."""
    root = os.path.join(shared_dir, "root")
    with CheckpointManager(root, async_save=False, handle_preemption=False) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((64,), float(step))})
    leftover = os.path.join(root, ".step-00000003.tmp-ab12")
    os.makedirs(os.path.join(leftover, "data"))
    then = time.time() - 7200
    for p in (os.path.join(leftover, "data"), leftover):
        os.chmod(p, 0o777)
        os.utime(p, (then, then))
    os.chmod(root, 0o777)
    for name in (".manager.json", "latest"):
        os.chmod(os.path.join(root, name), 0o666)
    os.chmod(os.path.join(root, step_name(2)), 0)
    got = _run_unprivileged(_MANAGER_ROOT.replace("ROOT", repr(root)))
    assert got["restore"] == 1
    assert any("step-00000002" in w and "Permission" in w for w in got["warnings"])
    assert [name for name, _ in got["cleanup"]] == [".step-00000003.tmp-ab12"]  # went on
    status, text = got["ls"]
    assert status == 0, text
    rows = {r["name"]: r for r in json.loads(text)["checkpoints"]}
    assert rows[step_name(2)]["state"] == "unreadable"
    assert "Permission denied" in rows[step_name(2)]["error"]
    assert rows[step_name(1)]["state"] == "committed"
    status, text = got["gc"]
    assert status == 0, text
    doc = json.loads(text)
    assert [r["name"] for r in doc["removed"]] == [".step-00000003.tmp-ab12"]
    assert [r["name"] for r in doc["kept"]] == [step_name(2)]
    assert os.path.isdir(os.path.join(root, step_name(2)))


def test_leftovers_of_a_root_holding_plain_files(tmp_path):
    """``rootdir.leftovers`` (the local tier's cleanup) over a root that holds a plain file such
    as a manager's ``latest``: no NotADirectoryError, and the file is no leftover."""
    from shardckpt.format import root as rootdir
    from shardckpt.storage import open_storage
    with CheckpointManager(tmp_path, async_save=False, handle_preemption=False) as mgr:
        mgr.save(1, small_state())
    (tmp_path / "notes.txt").write_text("a user's file")
    (tmp_path / "step-00000002" / "data").mkdir(parents=True)  # a real leftover
    assert rootdir.leftovers(open_storage(tmp_path)) == ["step-00000002"]
