"""HF-layout and streaming safetensors export (shardckpt.ops.export): shards, index, dtypes, errors,
atomicity, and memory bounded by one output file."""

import json
import os
import subprocess
import sys

import pytest
import torch

import shardckpt
from shardckpt.ops import export, safetensors_out
from shardckpt.errors import ExportError

safetensors_torch = pytest.importorskip("safetensors.torch")


def _ckpt(tmp_path, model, name="ck", **kw):
    path = tmp_path / name
    shardckpt.save({"model": model, "step": 3}, path, **kw)
    return path


def _weights():
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(64, 16, generator=g),
            "layers": [{"w": torch.randn(16, 16, generator=g).to(torch.bfloat16),
                        "b": torch.randn(16, generator=g)} for _ in range(3)],
            "positions": torch.arange(40, dtype=torch.int64),
            "mask": torch.rand(7, 3, generator=g) > 0.5,
            "scale": torch.tensor(2.5, dtype=torch.float64)}


def _read_hf(folder):
    index = json.loads((folder / export.HF_INDEX).read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        out.update(safetensors_torch.load_file(str(folder / fname)))
    assert set(out) == set(index["weight_map"])
    return index, out


def test_hf_export_shards_index_and_exact_values(tmp_path):
    weights = _weights()
    ck = _ckpt(tmp_path, weights)
    info = export.export_hf(ck, tmp_path / "hf", max_shard_size="1KB")
    index, got = _read_hf(tmp_path / "hf")
    flat = export.flat_tensors(weights)
    assert set(got) == set(flat) and info["tensors"] == len(flat)
    for name, t in flat.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    files = sorted(os.listdir(tmp_path / "hf"))
    assert info["files"] == len(files) - 1 >= 3
    assert files[0] == f"model-00001-of-{info['files']:05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in flat.values())
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".hf.tmp")]


def test_hf_export_casts_floats_only(tmp_path):
    ck = _ckpt(tmp_path, _weights())
    export.export_hf(ck, tmp_path / "hf", dtype="bf16")
    _, got = _read_hf(tmp_path / "hf")
    assert got["embed.weight"].dtype == torch.bfloat16
    assert got["positions"].dtype == torch.int64 and got["mask"].dtype == torch.bool
    assert torch.equal(got["embed.weight"], _weights()["embed.weight"].to(torch.bfloat16))


def test_name_collision_and_unsupported_dtype_are_typed(tmp_path):
    ck = _ckpt(tmp_path, {"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}})
    with pytest.raises(ExportError, match="a.b"):
        export.export_hf(ck, tmp_path / "hf")
    ck2 = _ckpt(tmp_path, {"z": torch.ones(2, dtype=torch.complex64)}, name="ck2")
    with pytest.raises(ExportError, match="'z'.*complex64"):
        export.export_weights(ck2, tmp_path / "z.safetensors")
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "z.safetensors")


def test_failed_export_leaves_nothing_and_keeps_old_output(tmp_path, monkeypatch):
    ck = _ckpt(tmp_path, _weights())
    export.export_hf(ck, tmp_path / "hf", max_shard_size="1KB")
    before = sorted(os.listdir(tmp_path / "hf"))
    real, calls = safetensors_out.write_file, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(*args, **kw)
    monkeypatch.setattr(safetensors_out, "write_file", failing)
    with pytest.raises(OSError, match="disk went away"):
        export.export_hf(ck, tmp_path / "hf", max_shard_size="1KB", overwrite=True)
    assert sorted(os.listdir(tmp_path / "hf")) == before
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]  # no temporary folder left
    with pytest.raises(FileExistsError):
        export.export_hf(ck, tmp_path / "hf")


def test_single_file_safetensors_streams_with_tied_names(tmp_path):
    w = torch.randn(8, 4)
    ck = _ckpt(tmp_path, {"emb": w, "head": w, "n": torch.arange(3, dtype=torch.int32)})
    info = export.export_weights(ck, tmp_path / "m.safetensors", prefix="model.")
    got = safetensors_torch.load_file(str(tmp_path / "m.safetensors"))
    assert info["tensors"] == 3
    assert torch.equal(got["model.emb"], w) and torch.equal(got["model.head"], w)
    assert torch.equal(got["model.n"], torch.arange(3, dtype=torch.int32))


_PEAK = r"""
import os, sys, threading, time
import shardckpt
from shardckpt.ops import export
from shardckpt.format.opening import open_for_read

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak_growth(fn):
    base, peak, stop = rss(), [0], threading.Event()
    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss() - base)
            time.sleep(0.002)
    t = threading.Thread(target=watch)
    t.start()
    try:
        result = fn()
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], rss() - base)
    return peak[0], result

open_for_read(sys.argv[1])
import torch.distributed.tensor  # noqa: F401  a one-time import (~40 MiB) that any load makes
grew, _ = peak_growth(lambda: export.export_hf(sys.argv[1], sys.argv[2],
                                                 max_shard_size=sys.argv[3]))
whole, full = peak_growth(lambda: shardckpt.load_full(sys.argv[1], key="model"))
print(grew, whole)
"""


def test_hf_export_memory_is_bounded_by_one_output_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    model = {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(36)}
    size = sum(t.numel() * t.element_size() for t in model.values())  # 144 MiB
    ck = _ckpt(tmp_path, model, codec="raw")
    del model
    run = subprocess.run([sys.executable, "-c", _PEAK, str(ck), str(tmp_path / "hf"), "9MB"],
                         capture_output=True, text=True, timeout=300, check=True)
    growth, whole = map(int, run.stdout.split()[-2:])
    print(f"export peak growth {growth / 2**20:.1f} MiB, load_full {whole / 2**20:.1f} MiB, "
          f"model {size / 2**20:.0f} MiB")
    assert whole > size * 0.9  # the probe sees a whole-model read (it can fail)
    assert len(os.listdir(tmp_path / "hf")) == 18 + 1  # two 4 MiB tensors per 9 MB file
    assert growth < size / 3, f"peak memory grew {growth / 2**20:.0f} MiB for {size / 2**20} MiB"


def test_cli_convert_to_hf(tmp_path, capsys):
    from shardckpt.cli import main
    ck = _ckpt(tmp_path, _weights())
    assert main(["convert", str(ck), "--to", "hf", str(tmp_path / "hf"), "--max-shard-size",
                 "1KB", "--dtype", "bf16"]) == 0
    assert "in 4 files" in capsys.readouterr().out
    _, got = _read_hf(tmp_path / "hf")
    assert got["layers.0.w"].dtype == torch.bfloat16 and got["mask"].dtype == torch.bool
    assert main(["convert", str(ck), "--to", "hf", str(tmp_path / "hf")]) == 1  # exists
    assert main(["convert", str(ck), "--to", "hf", str(tmp_path / "x"), "--max-shard-size",
                 "lots"]) == 2


_LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # the same initial weights in every process
    return LlamaForCausalLM(LlamaConfig(**_LLAMA))


def _module_of(weights: dict) -> torch.nn.Module:
    """A module tree holding ``weights`` under their dotted names (the ranks get the HF model's
    exact parameters without each importing transformers)."""
    root = torch.nn.Module()
    for name, t in weights.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(t.clone()))
    return root


def _save_fsdp2(rank, world, path, weights):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    model = _module_of(weights)
    for layer in model.model.layers.children():
        fully_shard(layer)
    fully_shard(model)
    shardckpt.save({"model": get_model_state_dict(model), "step": 1}, path, timeout=120)


def test_hf_export_of_2_rank_fsdp2_checkpoint_loads_with_from_pretrained(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from shardckpt.format.opening import open_for_read
    from shardckpt.testing import run_with_ranks
    from transformers import LlamaForCausalLM
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = _llama()
    run_with_ranks(2, _save_fsdp2, str(tmp_path / "ck"), dict(ref.state_dict()), timeout=240)
    m, _ = open_for_read(tmp_path / "ck")
    assert m.world_size == 2 and max(len(e.boxes) for e in m.tensors.values()) == 2
    info = export.export_hf(tmp_path / "ck", tmp_path / "hf", max_shard_size="20KB",
                            config=ref.config.to_dict())
    assert info["files"] >= 4
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    want, got = ref.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
