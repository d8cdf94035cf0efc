"""The torchtitan backend with torchtitan's real objects (ModelWrapper, OptimizersContainer,
LRSchedulersContainer, ParallelAwareDataloader) in the loop torchtitan's Trainer runs
(tests/integrations/titan_job.py): FSDP2 on 2 gloo ranks saves and resumes bit-exactly on 2
ranks and loads on 1; a SIGTERM mid-run makes every rank save and stop; the last model-only save
is in export_dtype; initial_load_path, exclude_from_loading, keep_latest_k and a run that started
with torchtitan's DCP backend."""

import importlib.util
import os

import pytest
import torch

import shardckpt
from shardckpt.testing import run_with_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None,
                                reason="needs shardckpt[torchtitan] and torchtitan (--no-deps)")


def _config(**fields):
    from shardckpt.integrations.torchtitan import ShardCkptCheckpointManager
    base = dict(enable=True, folder="ckpt", interval=2, keep_latest_k=2,
                last_save_model_only=False)
    return ShardCkptCheckpointManager.Config(**{**base, **fields})


def _train(rank, world, config, dump, steps, load_step=-1, kill_at=None):
    from tests.integrations import titan_job
    return titan_job.train(rank, world, config, dump, steps, load_step, kill_at)


def _steps(folder) -> list[str]:
    return sorted((n for n in os.listdir(folder) if n.startswith("step-")),
                  key=lambda n: int(n[5:]))


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fsdp2_on_two_ranks_resumes_bit_exactly_on_two_and_loads_on_one(tmp_path):
    ref = run_with_ranks(2, _train, _config(enable=False), str(tmp_path / "ref"), 10,
                         timeout=200)
    first = run_with_ranks(2, _train, _config(), str(tmp_path / "run"), 6, timeout=200)
    assert _steps(tmp_path / "run" / "ckpt") == ["step-4", "step-6"]  # torchtitan's names
    resumed = run_with_ranks(2, _train, _config(), str(tmp_path / "run"), 10, timeout=200)
    start, losses, weights, lr, tokens = resumed[0].value
    assert start == 7  # the train state came back
    # Model, AdamW moments, lr schedule and data position: the same run as without a stop.
    assert first[0].value[1] + losses == ref[0].value[1]
    _same(weights, ref[0].value[2])
    assert (lr, tokens) == ref[0].value[3:]
    assert _steps(tmp_path / "run" / "ckpt") == ["step-8", "step-10"]  # keep_latest_k=2
    # One rank: the dataloader does not reshard (as with DCP), so it stays out of the load.
    one = run_with_ranks(1, _train, _config(exclude_from_loading=["dataloader"]),
                         str(tmp_path / "run"), 10, timeout=200)
    assert one[0].value[0] == 11
    _same(one[0].value[2], weights)
    assert one[0].value[3:] == (lr, tokens)


def test_sigterm_on_one_rank_saves_every_rank_and_the_run_resumes_bit_exactly(tmp_path):
    ref = run_with_ranks(2, _train, _config(enable=False), str(tmp_path / "ref"), 8,
                         timeout=200)
    stopped = run_with_ranks(2, _train, _config(interval=4), str(tmp_path / "run"), 8, -1, 3,
                             timeout=200, expect_errors=True)
    assert [r.error for r in stopped] == [f"SystemExit: {shardckpt.EXIT_PREEMPTED}"] * 2
    assert _steps(tmp_path / "run" / "ckpt") == ["step-3"]  # the step the signal came in
    resumed = run_with_ranks(2, _train, _config(interval=4), str(tmp_path / "run"), 8,
                             timeout=200)
    assert resumed[0].value[0] == 4
    assert resumed[0].value[1] == ref[0].value[1][3:]
    _same(resumed[0].value[2], ref[0].value[2])


def _one(tmp_path, config, steps, **kw):
    """The job in this process (one rank, no process group)."""
    from tests.integrations import titan_job
    return titan_job.train(0, 1, config, str(tmp_path), steps, **kw)


def test_last_save_model_only_is_weights_in_export_dtype_and_an_initial_load(tmp_path):
    config = _config(last_save_model_only=True, export_dtype="bfloat16", async_mode="disabled",
                     handle_preemption=False)
    _, _, weights, _, _ = _one(tmp_path / "a", config, 4)
    last = shardckpt.load_full(tmp_path / "a" / "ckpt" / "step-4")
    assert set(last) == {"model"}
    _same(last["model"], {k: v.to(torch.bfloat16) for k, v in weights.items()})
    # A new run starts from it (model only); its own folder is still empty.
    start = _config(initial_load_path=str(tmp_path / "a" / "ckpt" / "step-2"),
                    initial_load_model_only=True, handle_preemption=False)
    first, _, loaded, _, _ = _one(tmp_path / "b", start, 0)
    assert first == 1  # model only: the train state did not come with it
    _same(loaded, shardckpt.load_full(tmp_path / "a" / "ckpt" / "step-2")["model"])


def test_exclude_from_loading_keeps_the_live_values(tmp_path):
    config = _config(handle_preemption=False)
    _one(tmp_path, config, 4)
    skip = _config(exclude_from_loading=["train_state", "lr_scheduler"], handle_preemption=False)
    first, _, _, lr, _ = _one(tmp_path, skip, 0)
    assert first == 1  # the step was not loaded...
    from tests.integrations import titan_job
    _, _, _, lr_fresh, _ = titan_job.train(0, 1, _config(enable=False), str(tmp_path / "x"), 0)
    assert lr == lr_fresh  # ...nor the schedule


def test_a_run_that_saved_with_torchtitans_dcp_backend_continues_with_shardckpt(tmp_path):
    from torchtitan.components.checkpointer import CheckpointManager
    dcp = CheckpointManager.Config(enable=True, folder="ckpt", interval=2, keep_latest_k=0,
                                   last_save_model_only=False)
    ref = _one(tmp_path / "ref", _config(enable=False), 6)
    _one(tmp_path / "run", dcp, 4)
    assert os.path.isfile(tmp_path / "run" / "ckpt" / "step-4" / ".metadata")
    first, losses, weights, _, _ = _one(tmp_path / "run", _config(handle_preemption=False), 6)
    assert first == 5 and losses == ref[1][4:]
    _same(weights, ref[2])
    assert shardckpt.verify(tmp_path / "run" / "ckpt" / "step-6").ok


def test_incremental_saves_reference_the_previous_checkpoint(tmp_path):
    config = _config(incremental=True, keep_latest_k=0, handle_preemption=False, codec="raw")
    _one(tmp_path, config, 4)
    from shardckpt.format.opening import open_manifest
    from shardckpt.storage import open_storage
    storage = open_storage(tmp_path / "ckpt")
    chain = [open_manifest(storage, f"step-{s}").metadata["shardckpt.torchtitan"]["chain"]
             for s in (2, 4)]
    assert chain == [0, 1]  # step-4 was saved against step-2
    full = shardckpt.load_full(tmp_path / "ckpt" / "step-4")
    assert set(full) >= {"model", "optimizer", "lr_scheduler", "dataloader", "train_state"}
    assert shardckpt.verify(tmp_path / "ckpt" / "step-4").ok


def test_config_fields_are_checked():
    with pytest.raises(ValueError, match="shardckpt export"):
        _config(last_save_in_hf=True, last_save_model_only=True)
    with pytest.raises(ValueError, match="Invalid async_mode"):
        _config(async_mode="threads")
    with pytest.raises(ValueError, match="codec"):
        _config(codec="lz4")
    assert _config(async_mode="ASYNC").async_mode == "async"


def _train_tiered(rank, world, config, dump, steps, stop_at=None):
    from tests.integrations import titan_job
    os.environ.update(RANK=str(rank), LOCAL_WORLD_SIZE="1")  # each rank a node of its own
    os.environ.pop("GROUP_RANK", None)
    return titan_job.train(rank, world, config, dump, steps, stop_at=stop_at)


def test_the_local_tier_resumes_from_a_step_newer_than_the_durable_one(tmp_path):
    tier = dict(interval=4, local_folder=str(tmp_path / "local" / "node-{node}"),
                local_interval=1, local_on_busy="wait", handle_preemption=False)
    ref = run_with_ranks(2, _train, _config(enable=False), str(tmp_path / "ref"), 8,
                         timeout=200)
    # The job stops after step 6 (as if killed): durable step 4, local steps up to 6.
    run_with_ranks(2, _train_tiered, _config(**tier), str(tmp_path / "run"), 8, 6, timeout=200)
    assert _steps(tmp_path / "run" / "ckpt") == ["step-4"]
    resumed = run_with_ranks(2, _train_tiered, _config(**tier), str(tmp_path / "run"), 8,
                             timeout=200)
    assert resumed[0].value[0] == 7  # local step 6, newer than the durable step 4
    assert resumed[0].value[1] == ref[0].value[1][6:]
    _same(resumed[0].value[2], ref[0].value[2])


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path):
    from shardckpt.testing import flip_byte
    config = _config(async_mode="disabled", handle_preemption=False)
    _one(tmp_path, config, 4)
    data = tmp_path / "ckpt" / "step-4" / "data"
    flip_byte(next(p for p in sorted(data.iterdir()) if p.stat().st_size > 64), 40)
    first, _, _, _, _ = _one(tmp_path, config, 4)
    assert first == 3  # step-2 loaded (a warning names step-4 and its damage)
