"""Bit-exact save/load round trips of everything the public API accepts."""

import math

import pytest
import torch

import shardckpt
from shardckpt import codecs
from tests.helpers import all_dtype_state, assert_same

CODECS = ["auto", "zstd", "raw"]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("codec", CODECS)
def test_every_dtype_round_trips_bit_exactly(ckpt, gen, codec):
    state = all_dtype_state(gen)
    shardckpt.save(state, ckpt, codec=codec, chunk_bytes=64)  # many chunks per tensor
    assert_same(state, shardckpt.load_full(ckpt))
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    shardckpt.load(target, ckpt)
    assert_same(state, target)


def test_python_values_and_containers(ckpt):
    state = {"step": 7, "big": 2**80, "lr": 0.1, "nan": math.nan, "inf": -math.inf,
             "neg0": -0.0, "name": "run/ü~x", "flag": True, "none": None,
             "dtype": torch.bfloat16, "tuple": (1, (2.5, "x"), []), "list": [{"a": 1}, None],
             3: "int key", "nested": {"deep": {"deeper": [torch.arange(4)]}}}
    shardckpt.save(state, ckpt)
    loaded = shardckpt.load_full(ckpt)
    assert_same(state, loaded)
    assert math.copysign(1, loaded["neg0"]) == -1


def test_non_contiguous_views_and_conjugates(ckpt, gen):
    base = torch.randn(6, 8, generator=gen)
    c = torch.randn(5, dtype=torch.complex64, generator=gen)
    state = {"t": base.t(), "strided": base[::2, 1::3], "expanded": base[0].expand(3, 8),
             "conj": c.conj(), "neg": c.conj().imag}
    shardckpt.save(state, ckpt)
    assert_same(state, shardckpt.load_full(ckpt))
    target = {"t": torch.zeros(8, 6).t().contiguous().t(), "strided": torch.zeros(3, 3),
              "expanded": torch.zeros(3, 8), "conj": torch.zeros(5, dtype=torch.complex64),
              "neg": torch.zeros(5)}
    shardckpt.load(target, ckpt)
    assert_same(state, target)


def test_shared_storage_saved_once_and_restored_shared(ckpt, gen):
    a = torch.randn(10, generator=gen)
    state = {"a": a, "b": a, "part": a[2:5], "reshaped": a.view(2, 5)}
    shardckpt.save(state, ckpt)
    loaded = shardckpt.load_full(ckpt)
    assert_same(state, loaded)
    assert loaded["a"] is loaded["b"]  # the same view: one tensor again
    manifest = shardckpt.format.opening.open_manifest(*shardckpt.storage.open_checkpoint(ckpt))
    assert len(manifest.tensors) == 3


def test_module_and_optimizer_state(ckpt, gen):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(4, 8, generator=gen)).square().mean().backward()
        opt.step()
    shardckpt.save({"model": model, "optim": opt, "step": 3}, ckpt)

    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Linear(16, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5.0)  # no state yet, other lr
    state = {"model": fresh, "optim": fresh_opt, "step": 0}
    shardckpt.load(state, ckpt)
    assert state["step"] == 3
    assert_same(model.state_dict(), fresh.state_dict())
    assert_same(opt.state_dict(), fresh_opt.state_dict())
    assert fresh_opt.param_groups[0]["lr"] == 1e-3


def test_empty_and_zero_dim(ckpt):
    state = {"empty": torch.empty(0, 3), "scalar": torch.tensor(2.5), "none": torch.empty(0)}
    shardckpt.save(state, ckpt)
    assert_same(state, shardckpt.load_full(ckpt))


def test_large_tensor_many_chunks_all_codecs(tmp_path, gen):
    weights = (torch.randn(1 << 20, generator=gen) * 0.02).to(torch.bfloat16)
    for codec in CODECS:
        info = shardckpt.save({"w": weights}, tmp_path / codec, codec=codec, chunk_bytes=1 << 16)
        assert_same({"w": weights}, shardckpt.load_full(tmp_path / codec))
        if codec == "zstd":
            assert info.stored_bytes < 0.8 * info.raw_bytes  # shuffled bf16 compresses
        if codec == "raw":
            assert info.stored_bytes == info.raw_bytes


def test_verify_reports_counts(ckpt, gen):
    shardckpt.save({"x": torch.randn(1000, generator=gen)}, ckpt, chunk_bytes=400)
    report = shardckpt.verify(ckpt)
    assert (report.tensors, report.chunks, report.raw_bytes) == (1, 10, 4000)


def test_metadata_round_trips_and_must_be_json(ckpt):
    shardckpt.save({"x": 1}, ckpt, metadata={"loss": 0.5, "tags": ["a"]})
    manifest = shardckpt.format.opening.open_manifest(*shardckpt.storage.open_checkpoint(ckpt))
    assert manifest.metadata == {"loss": 0.5, "tags": ["a"]}
    with pytest.raises(shardckpt.UnsupportedValueError):
        shardckpt.save({"x": 1}, ckpt.with_name("other"), metadata={"obj": object()})


def test_backend_is_native():
    # The suite must exercise the native core; the reference codec is only a fallback.
    assert codecs.BACKEND == "native"


def test_the_front_door_functions_survive_importing_every_submodule():
    """``shardckpt.save`` / ``shardckpt.load`` are functions and also the names of the pipeline
    packages; importing any submodule must never rebind the functions to the packages."""
    import importlib
    import pkgutil
    for m in pkgutil.walk_packages(shardckpt.__path__, "shardckpt."):
        if m.name != "shardckpt.__main__" and ".integrations." not in m.name:
            importlib.import_module(m.name)
    assert callable(shardckpt.save) and callable(shardckpt.load)
    assert shardckpt.save.__module__ == "shardckpt.api"
    assert shardckpt.load.__module__ == "shardckpt.api"


def test_loading_part_of_a_checkpoint_names_strict_false(ckpt):
    model = torch.nn.Linear(4, 2)
    shardckpt.save({"model": model.state_dict(), "step": 3, "optim": {"lr": 0.1}}, ckpt)
    target = torch.nn.Linear(4, 2)
    with pytest.raises(shardckpt.StateMismatchError, match=r"unexpected.*strict=False"):
        shardckpt.load({"model": target.state_dict()}, ckpt)
    shardckpt.load({"model": target.state_dict()}, ckpt, strict=False)
    assert torch.equal(target.weight, model.weight)
