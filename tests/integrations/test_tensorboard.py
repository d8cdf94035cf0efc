"""The TensorBoard on_event writer: the event file holds the save scalars at each step."""

import importlib.util

import pytest
import torch

import shardckpt

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                reason="needs shardckpt[tensorboard]")


def test_event_file_holds_the_save_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from shardckpt.integrations.tensorboard import TensorBoardEvents
    tb = TensorBoardEvents(str(tmp_path / "runs"))
    committed = []

    def both(event):
        tb(event)
        if event.kind == "save_committed":
            committed.append(event)
    state = {"w": torch.zeros(512, 64), "noise": torch.randn(64)}
    with shardckpt.CheckpointManager(tmp_path / "ck", every_n_steps=5, on_event=both,
                                     save_options={"codec": "zstd"}) as mgr:
        for step in range(1, 16):
            mgr.maybe_save(step, state)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"shardckpt/save_stall_seconds", "shardckpt/save_seconds",
                    "shardckpt/stored_bytes", "shardckpt/compression_ratio"}
    for tag in tags:
        assert [e.step for e in acc.Scalars(tag)] == [5, 10, 15], tag
    stored = [e.value for e in acc.Scalars("shardckpt/stored_bytes")]
    assert stored == [float(e.stored_bytes) for e in committed]
    ratios = [e.value for e in acc.Scalars("shardckpt/compression_ratio")]
    assert all(r > 5 for r in ratios)  # mostly zeros: zstd shrinks it many times
    assert ratios == pytest.approx([e.ratio for e in committed], rel=1e-6)
