"""DCP interop: dcp.save/load through shardckpt's Writer and Reader, resharding by DCP."""

import torch
import torch.distributed.checkpoint as dcp

import shardckpt
from shardckpt.integrations.dcp import Reader, Writer
from shardckpt.testing import run_with_ranks
from tests.distributed.test_reshard import expected_full, sharded_state
from tests.helpers import assert_same


def _flat(state):
    return {"s0": state["model"]["s0"], "s1": state["model"]["s1"], "rep": state["model"]["rep"],
            "plain": state["model"]["plain"], "step": state["step"], "lr": 0.25,
            "betas": (0.9, 0.99)}


def _dcp_save(rank, world, path):
    dcp.save(_flat(sharded_state(world)), storage_writer=Writer(path, chunk_bytes=64))


def _dcp_load(rank, world, path):
    state = _flat(sharded_state(world, zeros=True))
    state.update(step=0, lr=0.0, betas=None)
    dcp.load(state, storage_reader=Reader(path))
    return {"s0": state["s0"].full_tensor(), "s1": state["s1"].full_tensor(),
            "rep": state["rep"].full_tensor(), "plain": state["plain"],
            "values": (state["step"], state["lr"], state["betas"])}


def test_dcp_writer_and_reader_reshard_2_to_3(tmp_path):
    path = str(tmp_path / "dcp")
    run_with_ranks(2, _dcp_save, path)
    shardckpt.verify(path)
    full = shardckpt.load_full(path)  # plain shardckpt reads what DCP wrote
    want = expected_full()
    assert_same({k: want[k] for k in ("s0", "s1", "rep", "plain")},
                {k: full[k] for k in ("s0", "s1", "rep", "plain")})
    assert (full["step"], full["lr"], full["betas"]) == (42, 0.25, (0.9, 0.99))
    for r in run_with_ranks(3, _dcp_load, path):
        assert_same({k: want[k] for k in ("s0", "s1", "rep", "plain")},
                    {k: r.value[k] for k in ("s0", "s1", "rep", "plain")})
        assert r.value["values"] == (42, 0.25, (0.9, 0.99))


def test_dcp_reader_loads_a_shardckpt_checkpoint(tmp_path):
    path = str(tmp_path / "native")
    state = {"model": {"w": torch.arange(12.0).reshape(3, 4)}, "step": 7}
    shardckpt.save(state, path)
    target = {"model": {"w": torch.zeros(3, 4)}, "step": 0}
    dcp.load(target, storage_reader=Reader(path))
    assert torch.equal(target["model"]["w"], state["model"]["w"]) and target["step"] == 7


def _rank_local_save(rank, world, path):
    from shardckpt.errors import UnsupportedSaveError
    try:
        dcp.save({"w": torch.full((4,), float(rank))}, storage_writer=Writer(path),
                 use_collectives=False)
    except UnsupportedSaveError as exc:
        return str(exc)
    return None


def test_rank_local_dcp_save_is_refused_on_every_rank(tmp_path):
    """dcp.save(use_collectives=False) would commit one manifest per rank into one folder;
    every rank refuses it before writing anything."""
    path = str(tmp_path / "local")
    results = run_with_ranks(2, _rank_local_save, path)
    assert all(r.error is None and r.value and "use_collectives=False" in r.value
               for r in results), results
    assert not (tmp_path / "local").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
