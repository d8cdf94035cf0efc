"""``shardckpt.load(state, hf_folder)``: Hugging Face weights folders into plain and FSDP2 /
tensor-parallel states, each rank reading only its slices' bytes; key maps, casts and one
typed error for every missing, unexpected or mismatched name."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import shardckpt
from shardckpt.errors import StateMismatchError
from shardckpt.load import hf
from shardckpt.testing import run_with_ranks


def _weights(seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(10, 6, generator=gen).to(dtype),
            "layers.0.w": torch.randn(7, 6, generator=gen).to(dtype),
            "layers.0.b": torch.randn(7, generator=gen).to(dtype),
            "norm.weight": torch.ones(6, dtype=dtype),
            "steps": torch.arange(3, dtype=torch.int64)}


class Net(torch.nn.Module):
    """A module whose state dict has the names ``_weights`` writes; ``head`` is tied to
    ``embed``, as HF models tie their output layer."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6, dtype=dtype)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 7, dtype=dtype)])
        self.norm = torch.nn.LayerNorm(6, elementwise_affine=True, bias=False, dtype=dtype)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        self.head = torch.nn.Linear(6, 10, bias=False, dtype=dtype)
        self.head.weight = self.embed.weight

    def load_names(self):
        return {"embed.weight": "embed.weight", "layers.0.w": "layers.0.weight",
                "layers.0.b": "layers.0.bias", "norm.weight": "norm.weight",
                "steps": "steps"}


def _folder(tmp_path, weights, shards=1):
    """An HF folder: one model.safetensors, or ``shards`` files and an index."""
    folder = tmp_path / "hf"
    folder.mkdir()
    if shards == 1:
        save_file(weights, str(folder / "model.safetensors"))
        return folder
    names = list(weights)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[k::shards]}
        save_file(part, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    return folder


def _renamed(net):
    names = net.load_names()
    return lambda n: names.get(n)


@pytest.mark.parametrize("shards", [1, 3])
def test_plain_module_with_cast_and_tied_weights(tmp_path, shards):
    weights = _weights()
    folder = _folder(tmp_path, weights, shards)
    net = Net()
    shardckpt.load(net, folder, key_map=_renamed(net))
    assert torch.equal(net.embed.weight, weights["embed.weight"].float())
    assert net.head.weight is net.embed.weight  # tied: filled once, never reported missing
    assert torch.equal(net.layers[0].bias, weights["layers.0.b"].float())
    assert torch.equal(net.steps, weights["steps"])
    stats = hf.last_stats
    assert stats.tensors == 5 and stats.placed_bytes == sum(
        t.numel() * t.element_size() for t in weights.values())
    assert stats.placed_bytes <= stats.read_bytes <= 1.05 * stats.placed_bytes + 4096


def test_prefix_and_dict_key_maps(tmp_path):
    weights = {"model.a": torch.randn(4), "model.b": torch.randn(2, 2)}
    folder = _folder(tmp_path, weights)
    state = {"model": {"model": {"a": torch.zeros(4), "b": torch.zeros(2, 2)}},
             "optim": {"lr": torch.zeros(1)}}  # outside the prefix: not expected
    shardckpt.load(state, folder, key_map="model.")
    assert torch.equal(state["model"]["model"]["b"], weights["model.b"])
    target = {"a": torch.zeros(4), "b": torch.zeros(2, 2)}
    shardckpt.load(target, folder, key_map={"model.": ""})
    assert torch.equal(target["a"], weights["model.a"])


def test_every_difference_in_one_error_and_target_untouched(tmp_path):
    folder = _folder(tmp_path, {"a": torch.randn(4), "b": torch.randn(3), "c": torch.randn(2),
                                "i": torch.arange(2, dtype=torch.int32)})
    target = {"a": torch.zeros(5), "d": torch.zeros(1), "c": torch.zeros(2),
              "i": torch.zeros(2)}
    with pytest.raises(StateMismatchError) as info:
        shardckpt.load(target, folder)
    err = info.value
    assert err.missing == ["d"] and err.unexpected == ["b"]
    assert {k for k, _ in err.mismatched} == {"a", "i"}  # shape; int into float
    assert "model.safetensors" in str(err)
    assert not target["c"].any()  # nothing was read
    shardckpt.load({"c": target["c"]}, folder, strict=False)
    assert target["c"].any()


def test_key_map_only_for_hf_folders(tmp_path):
    shardckpt.save({"a": torch.ones(2)}, tmp_path / "ck")
    with pytest.raises(TypeError, match="key_map"):
        shardckpt.load({"a": torch.zeros(2)}, tmp_path / "ck", key_map="x.")


def test_byte_runs_of_boxes():
    # rows 2..3 of a 5x4 float32: one run; columns 1..2: one run per row
    assert hf.byte_runs((5, 4), (2, 0), (2, 4), 4) == [(32, 32)]
    assert hf.byte_runs((3, 4), (0, 1), (3, 2), 4) == [(4, 8), (20, 8), (36, 8)]
    assert hf.byte_runs((), (), (), 2) == [(0, 2)]


def _sharded_load(rank, world, folder, placements):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    full = {"embed.weight": torch.zeros(10, 6), "layers.0.w": torch.zeros(7, 6),
            "layers.0.b": torch.zeros(7), "norm.weight": torch.zeros(6),
            "steps": torch.zeros(3, dtype=torch.int64)}
    state = {k: distribute_tensor(v, mesh, [Shard(min(placements, v.dim() - 1))])
             for k, v in full.items()}
    shardckpt.load(state, folder, timeout=60)
    stats = hf.last_stats
    return {"full": {k: v.full_tensor() for k, v in state.items()},
            "read": stats.read_bytes, "placed": stats.placed_bytes}


@pytest.mark.parametrize("dim", [0, 1])
def test_dtensor_shards_read_only_their_bytes(tmp_path, dim):
    """Shard(0) is FSDP2's layout (one run per tensor), Shard(1) tensor parallel's (a run per
    row); the ranks together read the folder's data once plus each its headers."""
    weights = _weights()
    folder = _folder(tmp_path, weights, shards=2)
    results = run_with_ranks(2, _sharded_load, str(folder), dim)
    for k, v in weights.items():
        assert torch.equal(results[0].value["full"][k], v.to(results[0].value["full"][k].dtype))
    data = sum(t.numel() * t.element_size() for t in weights.values())
    placed = sum(r.value["placed"] for r in results)
    read = sum(r.value["read"] for r in results)
    headers = 2 * sum(8 + int.from_bytes(open(folder / f, "rb").read(8), "little")
                      for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert placed == data and read == data + headers
    assert read <= 1.05 * placed + headers


def _llama_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=32, tie_word_embeddings=True)


def _fsdp_llama(seed):
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config())
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _fsdp_round_trip(rank, world, root):
    """Save a 2-rank FSDP2 Llama, ``shardckpt convert --to hf`` it on rank 0 (as it is, and
    cast to bf16), load each folder into a differently initialised fp32 FSDP2 model."""
    import torch.distributed as dist
    from shardckpt.cli import main
    model = _fsdp_llama(0)
    shardckpt.save({"model": model, "step": 5}, f"{root}/ck", timeout=60)
    saved = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        with open(f"{root}/config.json", "w") as fh:
            fh.write(_llama_config().to_json_string())
        for name, extra in (("hf", []), ("hf16", ["--dtype", "bf16"])):
            assert main(["convert", f"{root}/ck", f"{root}/{name}", "--to", "hf", "--key",
                         "model", "--max-shard-size", "60KB", "--config",
                         f"{root}/config.json", *extra]) == 0
    dist.barrier()
    out = {"saved": saved}
    for name in ("hf", "hf16"):
        fresh = _fsdp_llama(1)  # other initial weights: every value must come from the folder
        shardckpt.load(fresh, f"{root}/{name}", timeout=60)
        out[name] = {k: v.full_tensor() for k, v in fresh.state_dict().items()}
        out[name + "_bytes"] = (hf.last_stats.read_bytes, hf.last_stats.placed_bytes)
    return out


def test_round_trip_convert_to_hf_then_fsdp2_and_from_pretrained(tmp_path):
    """A 2-rank FSDP2 checkpoint, exported by ``shardckpt convert --to hf``, loads back into a
    2-rank FSDP2 model bit for bit, and ``AutoModelForCausalLM.from_pretrained`` loads it."""
    transformers = pytest.importorskip("transformers")
    results = run_with_ranks(2, _fsdp_round_trip, str(tmp_path))
    saved = results[0].value["saved"]
    for result in results:
        assert saved.keys() == result.value["hf"].keys() == result.value["hf16"].keys()
        for k in saved:
            assert torch.equal(saved[k], result.value["hf"][k]), k
            assert torch.equal(saved[k].bfloat16().float(), result.value["hf16"][k]), k
    for name in ("hf_bytes", "hf16_bytes"):  # all ranks together: each slice read once
        read, placed = (sum(r.value[name][i] for r in results) for i in (0, 1))
        assert read <= 1.05 * placed, (name, read, placed)
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 1
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
