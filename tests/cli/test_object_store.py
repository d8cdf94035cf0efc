"""Every subcommand against object storage (fsspec memory:// and S3 on a moto server), with
the storage options given on the command line."""

import json

import pytest
import torch

from shardckpt.manage.manager import CheckpointManager
from shardckpt.storage import open_storage


@pytest.fixture(params=["memory", "s3"])
def store(request):
    """``(root url, storage_options)`` of an empty prefix."""
    if request.param == "memory":
        return request.getfixturevalue("memory_url"), {}
    return request.getfixturevalue("s3_url")


def _o(options: dict) -> list[str]:
    args = []
    for k, v in options.items():
        args += ["-o", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return args


def test_every_subcommand_on_object_storage(store, run, tmp_path):
    url, opts = store
    o = _o(opts)
    with CheckpointManager(url, storage_options=opts, async_save=False,
                           handle_preemption=False) as mgr:
        for step, loss in ((1, 2.0), (2, 1.0)):
            mgr.save(step, {"model": {"w": torch.full((64,), float(step))}, "step": step},
                     {"loss": loss})
    storage = open_storage(url, opts)
    storage.write("step-00000003/data/rank-00000.bin", b"x" * 100)  # an interrupted save

    doc = run.json("ls", url, *o)
    states = {r["name"]: r["state"] for r in doc["checkpoints"]}
    assert states == {"step-00000001": "committed", "step-00000002": "committed",
                      "step-00000003": "uncommitted"}
    assert (doc["latest"], doc["best"]) == (2, 2)

    one, two = f"{url}/step-00000001", f"{url}/step-00000002"
    assert run.json("inspect", one, *o)["tensors"]["model/w"]["shape"] == [64]
    assert run.json("verify", one, *o)["ok"]
    rows = run.json("diff", one, two, *o, status=1)["tensors"]
    assert rows[0]["key"] == "model/w" and rows[0]["max_abs"] == 1.0

    out = tmp_path / "w.safetensors"
    assert run.json("convert", two, "--to", "safetensors", out, "--weights-only", *o)[
        "tensors"] == 1
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(out))["w"], torch.full((64,), 2.0))

    doc = run.json("gc", url, "--older-than", "0", *o)
    assert [r["name"] for r in doc["removed"]] == ["step-00000003"]
    assert sorted(n for n in storage.list("") if n.startswith("step-")) == [
        "step-00000001", "step-00000002"]

    data = f"step-00000001/data/{storage.list('step-00000001/data')[0]}"
    blob = bytearray(storage.read(data))
    blob[-5] ^= 0xFF
    storage.write(data, bytes(blob), exclusive=False)
    status, _, err = run("verify", one, *o)
    assert status == 1 and "CorruptCheckpointError" in err


def test_import_dcp_into_object_storage(store, run, tmp_path):
    import torch.distributed.checkpoint as dcp
    url, opts = store
    state = {"model": {"w": torch.randn(16, 3)}, "step": 5}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "dcp")))
    out = f"{url}/imported"
    doc = run.json("import-dcp", tmp_path / "dcp", out, "--trust-pickle", *_o(opts))
    assert doc["tensors"] == 1
    loaded = run.json("verify", out, *_o(opts))
    assert loaded["ok"] and loaded["tensors"] == 1
    import shardckpt
    got = shardckpt.load_full(out, storage_options=opts)
    assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["step"] == 5
