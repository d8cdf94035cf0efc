"""import-dcp: a real torch.distributed.checkpoint FileSystemWriter checkpoint, bit-exactly."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

import shardckpt


@pytest.fixture
def dcp_dir(tmp_path):
    torch.manual_seed(2)
    state = {"model": {"w": torch.randn(33, 7), "b": torch.randn(9).to(torch.bfloat16),
                       "ids": torch.arange(12, dtype=torch.int32).reshape(3, 4)},
             "optim": {"state": {"0": {"exp_avg": torch.randn(33, 7)}},
                       "param_groups": [{"lr": 0.001, "params": ["0"]}]},
             "step": 41, "name": "run", "weird": {1, 2}}
    path = tmp_path / "dcp"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)))
    return path, state


def test_import_round_trips_bit_exactly(dcp_dir, tmp_path, run):
    path, state = dcp_dir
    out = tmp_path / "imported"
    status, text, err = run("import-dcp", path, out, "--trust-pickle", "--json")
    assert status == 0, err
    assert "warning: unpickling" in err and "dropped weird (set)" in err
    loaded = shardckpt.load_full(out)
    for key in ("w", "b", "ids"):
        want, got = state["model"][key], loaded["model"][key]
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8),
                                                       want.view(torch.uint8))
    assert torch.equal(loaded["optim"]["state"]["0"]["exp_avg"],
                       state["optim"]["state"]["0"]["exp_avg"])
    assert loaded["step"] == 41 and loaded["name"] == "run" and "weird" not in loaded
    assert loaded["optim"]["param_groups"][0]["lr"] == 0.001
    assert run("verify", out)[0] == 0


def test_import_needs_trust_and_a_dcp_folder(dcp_dir, tmp_path, run):
    path, _ = dcp_dir
    status, _, err = run("import-dcp", path, tmp_path / "out")
    assert status == 2 and "--trust-pickle" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    status, _, err = run("import-dcp", tmp_path, tmp_path / "out", "--trust-pickle")
    assert status == 1 and "CheckpointNotFoundError" in err
    assert run("import-dcp", path, tmp_path / "o2", "--trust-pickle")[0] == 0
    status, _, err = run("import-dcp", path, tmp_path / "o2", "--trust-pickle")
    assert status == 1 and "CheckpointExistsError" in err


def test_import_of_a_damaged_dcp_folder_fails_in_one_line(dcp_dir, tmp_path, run):
    path, _ = dcp_dir
    for data in path.glob("*.distcp"):
        data.unlink()
    status, _, err = run("import-dcp", path, tmp_path / "out", "--trust-pickle")
    assert status == 1 and "shardckpt: CheckpointError: " in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
