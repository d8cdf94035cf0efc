"""Careless and hostile inputs to the weights export (``shardckpt convert``, ``export_hf``,
``export_weights``): an export either writes a file that loads with every tensor, or refuses
with a typed error; it never destroys the checkpoint it reads nor loses a tensor silently."""

import json
import os

import pytest
import torch

import shardckpt
from shardckpt.ops import export
from shardckpt.cli import main as cli_main
from tests.helpers import assert_same

safetensors = pytest.importorskip("safetensors.torch")


def weights(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"model": {"a": torch.randn(64, generator=gen), "b": torch.randn(8, 8, generator=gen)}}


def saved(path, state=None):
    state = weights() if state is None else state
    shardckpt.save(state, str(path))
    return str(path), state


@pytest.mark.parametrize("how", ["hf", "safetensors"])
def test_a_tensor_named_like_the_safetensors_header_is_refused(tmp_path, how):
    ck, _ = saved(tmp_path / "ck", {"model": {"__metadata__": torch.ones(4),
                                              "x": torch.zeros(4)}})
    out = str(tmp_path / "out")
    with pytest.raises(shardckpt.ExportError, match="__metadata__"):
        if how == "hf":
            export.export_hf(ck, out)
        else:
            export.export_weights(ck, out)
    assert not os.path.exists(out)
    export.export_hf(ck, out, prefix="model.")  # a prefix makes it a plain name
    index = json.load(open(os.path.join(out, export.HF_INDEX)))
    assert sorted(index["weight_map"]) == ["model.__metadata__", "model.x"]


def test_a_tensor_under_the_empty_key_never_replaces_weight(tmp_path):
    ck, _ = saved(tmp_path / "ck", {"model": {"": torch.ones(3), "weight": torch.zeros(3)}})
    with pytest.raises(shardckpt.ExportError, match="'weight'"):
        export.export_weights(ck, str(tmp_path / "w.safetensors"))


@pytest.mark.parametrize("where", ["itself", "root"])
def test_hf_overwrite_never_deletes_the_checkpoint_or_its_root(tmp_path, where):
    root = tmp_path / "runs"
    root.mkdir()
    ck, state = saved(root / "step-1")
    out = ck if where == "itself" else str(root)
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export.export_hf(ck, out, overwrite=True)
    assert cli_main(["convert", ck, out, "--to", "hf", "--overwrite"]) != 0
    assert_same(state, shardckpt.load_full(ck))
    hf = str(tmp_path / "hf")  # an earlier export is still replaced
    export.export_hf(ck, hf)
    ck2, state2 = saved(tmp_path / "ck2", weights(1))
    export.export_hf(ck2, hf, overwrite=True)
    loaded = safetensors.load_file(os.path.join(hf, "model-00001-of-00001.safetensors"))
    assert torch.equal(loaded["a"], state2["model"]["a"])


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("target", ["manifest.json", "data/rank-00000.bin"])
def test_a_single_file_export_never_overwrites_a_file_of_its_source(tmp_path, fmt, target):
    ck, state = saved(tmp_path / "ck")
    with pytest.raises(shardckpt.ExportError, match="checkpoint it is read from"):
        export.export_weights(ck, os.path.join(ck, target), format=fmt)
    assert_same(state, shardckpt.load_full(ck))


def test_a_single_file_export_never_overwrites_a_referenced_file(tmp_path):
    """An incremental checkpoint reads files of its base: those are its source too."""
    state = weights()
    shardckpt.save(state, str(tmp_path / "a"), content_hashes=True)
    shardckpt.save(state, str(tmp_path / "b"), base="a")
    with pytest.raises(shardckpt.ExportError):
        export.export_weights(str(tmp_path / "b"), str(tmp_path / "a" / "data" / "rank-00000.bin"))
    assert_same(state, shardckpt.load_full(str(tmp_path / "b")))


def test_a_cast_to_a_non_floating_dtype_is_refused(tmp_path):
    ck, _ = saved(tmp_path / "ck")
    with pytest.raises(ValueError, match="floating"):
        export.export_hf(ck, str(tmp_path / "hf"), dtype=torch.int8)
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("config", ["missing.json", "bad.json", "list.json", 7])
def test_a_bad_config_is_refused_before_any_work(tmp_path, config, monkeypatch):
    ck, _ = saved(tmp_path / "ck")
    (tmp_path / "bad.json").write_text("{1,")
    (tmp_path / "list.json").write_text("[1, 2]")
    if isinstance(config, str):
        config = str(tmp_path / config)
    calls = []
    monkeypatch.setattr(export.safetensors_out, "write_file",
                        lambda *a, **k: calls.append(1) or 0)
    with pytest.raises(shardckpt.ExportError, match="config"):
        export.export_hf(ck, str(tmp_path / "hf"), config=config)
    assert calls == [] and not os.path.exists(tmp_path / "hf")
