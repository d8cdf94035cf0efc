"""Case 13 (issue 25): errors crossing torch DCP keep their type. DCP's loader catches what
``StorageReader.read_metadata`` raises and keeps only its text (an AssertionError); shardckpt's
Reader keeps the CheckpointError and raises it where DCP passes errors on, so that
``CheckpointException.failures[rank]`` holds it, on every rank."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import shardckpt
from shardckpt.integrations.dcp import Reader, Writer
from shardckpt.testing import run_with_ranks


def _flip_manifest(path) -> None:
    m = path / "manifest.json"
    m.write_text(m.read_text().replace('"format_version"', '"format_versiom"'))


def _damage(path, how: str) -> type:
    """Break the checkpoint at ``path``; the CheckpointError type a load must report."""
    if how == "manifest bytes":
        _flip_manifest(path)
        return shardckpt.CorruptCheckpointError
    if how == "no manifest":
        (path / "manifest.json").unlink()
        return shardckpt.IncompleteCheckpointError
    raise ValueError(how)


def _failures(exc: BaseException) -> list[BaseException]:
    assert isinstance(exc, CheckpointException), type(exc)
    return [e for e, _ in exc.failures.values()]


@pytest.mark.parametrize("how", ["manifest bytes", "no manifest"])
def test_a_broken_checkpoint_keeps_its_error_type_through_dcp_load(tmp_path, how):
    path = tmp_path / "c"
    dcp.save({"w": torch.arange(10.0)}, storage_writer=Writer(str(path)))
    expected = _damage(path, how)
    with pytest.raises(CheckpointException) as err:
        dcp.load({"w": torch.zeros(10)}, storage_reader=Reader(str(path)))
    (failure,) = _failures(err.value)
    assert isinstance(failure, expected), repr(failure)
    assert isinstance(failure, shardckpt.CheckpointError)
    assert "manifest" in str(failure)


def _load_broken(rank, world, path):
    try:
        dcp.load({"w": torch.zeros(8)}, storage_reader=Reader(path))
    except CheckpointException as exc:
        return sorted({type(e).__name__ for e in _failures(exc)})
    return "loaded"


def test_every_rank_sees_the_typed_error(tmp_path):
    path = tmp_path / "c"
    dcp.save({"w": torch.arange(8.0)}, storage_writer=Writer(str(path)))
    _flip_manifest(path)
    results = run_with_ranks(2, _load_broken, str(path), timeout=120)
    assert [r.value for r in results] == [["CorruptCheckpointError"]] * 2
