"""shardckpt.data.RankRNG: every generator restored bit for bit on the saving world size, and
reseeded by ``seed_for(seed, step, new rank)`` on another one (through real saves and loads on
gloo ranks)."""

from __future__ import annotations

import random

import numpy
import torch

import shardckpt
from shardckpt.data import RankRNG, seed_for
from shardckpt.testing import run_with_ranks


def draws() -> tuple:
    return (torch.rand(3).tolist(), random.random(), float(numpy.random.rand()))


def test_the_same_world_gets_every_generator_back():
    rng = RankRNG(seed=5, step=lambda: 40)
    torch.manual_seed(1), random.seed(2), numpy.random.seed(3)
    draws()
    saved = rng.state_dict()
    want = draws()
    draws()
    rng.load_state_dict(saved)
    assert draws() == want and rng.reseeded is None


def test_another_world_reseeds_from_the_seed_the_step_and_the_new_rank():
    saved = RankRNG(seed=5, step=lambda: 40, world=lambda: (1, 2)).state_dict()
    got = {}
    for rank in range(3):
        rng = RankRNG(seed=5, step=lambda: 0, world=lambda: (rank, 3))
        rng.load_state_dict(saved)
        assert rng.reseeded == seed_for(5, 40, rank)
        got[rank] = draws()
        torch.manual_seed(seed_for(5, 40, rank)), random.seed(seed_for(5, 40, rank))
        numpy.random.seed(seed_for(5, 40, rank) % 2**32)
        assert draws() == got[rank]
    assert len({str(v) for v in got.values()}) == 3  # no two ranks share a stream
    assert seed_for(5, 40, 0) != seed_for(5, 41, 0) != seed_for(6, 40, 0)
    assert 0 <= seed_for(2**40, 10**9, 7) < 2**63


def _save(rank, world, path):
    torch.manual_seed(100 + rank)
    rng = RankRNG(seed=9, step=lambda: 12)
    shardckpt.save({"rng": rng}, path)
    return torch.rand(2).tolist()


def _load(rank, world, path, per_rank):
    torch.manual_seed(0)
    rng = RankRNG(seed=9, step=lambda: 0)
    shardckpt.load({"rng": rng}, path, per_rank=per_rank)
    return rng.reseeded, torch.rand(2).tolist()


def test_saved_on_2_ranks_loaded_on_2_then_3(tmp_path):
    path = str(tmp_path / "ckpt")
    after = [r.value for r in run_with_ranks(2, _save, path)]
    same = [r.value for r in run_with_ranks(2, _load, path, "error")]
    assert same == [(None, after[0]), (None, after[1])]
    grown = [r.value for r in run_with_ranks(3, _load, path, "rank0")]
    for rank, (reseeded, values) in enumerate(grown):
        assert reseeded == seed_for(9, 12, rank)
        assert values == torch.rand(2, generator=torch.Generator().manual_seed(reseeded)).tolist()


def test_another_world_without_a_per_rank_rule_is_refused(tmp_path):
    path = str(tmp_path / "ckpt")
    run_with_ranks(2, _save, path)
    results = run_with_ranks(1, _load, path, "error", expect_errors=True)
    assert results[0].error_type == "StateMismatchError" and "per_rank" in results[0].error
