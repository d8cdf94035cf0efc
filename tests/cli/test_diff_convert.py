"""diff (numbers checked against torch) and convert (outputs loaded back)."""

import pytest
import torch


from .conftest import save_step


def _pair(root):
    torch.manual_seed(1)
    a = {"model": {"w": torch.randn(64, 32), "same": torch.arange(50.0),
                   "grow": torch.ones(4), "kind": torch.ones(3),
                   "bf": torch.randn(40).to(torch.bfloat16), "gone": torch.zeros(2)},
         "step": 1, "tag": "a"}
    b = {"model": {"w": a["model"]["w"] + 0.01 * torch.randn(64, 32), "same": torch.arange(50.0),
                   "grow": torch.ones(6), "kind": torch.ones(3, dtype=torch.float64),
                   "bf": (a["model"]["bf"].float() * 1.5).to(torch.bfloat16),
                   "new": torch.ones(1)},
         "step": 2, "tag": "a"}
    pa = save_step(root, 1, a, metrics={"loss": 2.0, "acc": 0.1})
    pb = save_step(root, 2, b, metrics={"loss": 1.5})
    return a, b, pa, pb


def _expected(x, y):
    x, y = x.double(), y.double()
    return (x - y).abs().max().item(), (torch.linalg.vector_norm(x - y)
                                        / torch.linalg.vector_norm(x)).item()


def test_diff_numbers_and_order(root, run):
    a, b, pa, pb = _pair(root)
    doc = run.json("diff", pa, pb, status=1)
    assert doc["equal"] is False and doc["added"] == ["model/new"] and doc["removed"] == ["model/gone"]
    layout = {c["key"]: c for c in doc["changed_layout"]}
    assert layout["model/grow"]["b"]["shape"] == [6]
    assert layout["model/kind"]["b"]["dtype"] == "float64"
    rows = {t["key"]: t for t in doc["tensors"]}
    assert "model/grow" not in rows  # shapes differ: nothing to subtract
    for key in ("w", "bf"):
        max_abs, rel = _expected(a["model"][key], b["model"][key])
        assert rows[f"model/{key}"]["max_abs"] == pytest.approx(max_abs, rel=1e-12)
        assert rows[f"model/{key}"]["rel_l2"] == pytest.approx(rel, rel=1e-12)
    assert rows["model/same"] == {"key": "model/same", "dtype": "float32", "max_abs": 0.0,
                                  "rel_l2": 0.0, "equal": True}
    assert rows["model/kind"]["equal"] is False and rows["model/kind"]["max_abs"] == 0.0
    rels = [t["rel_l2"] for t in doc["tensors"]]
    assert rels == sorted(rels, reverse=True) and doc["tensors"][0]["key"] == "model/bf"
    assert doc["values"] == [{"path": "step", "a": 1, "b": 2, "in": "both"}]
    assert doc["metrics"] == [{"name": "acc", "a": 0.1, "b": None},
                              {"name": "loss", "a": 2.0, "b": 1.5}]
    status, out, _ = run("diff", pa, pb, "--limit", "1")
    assert status == 1 and "added: model/new" in out and "more" in out and "loss" in out


def test_diff_zero_reference_and_bad_input(root, run, tmp_path):
    pa = save_step(root, 1, {"z": torch.zeros(3)})
    pb = save_step(root, 2, {"z": torch.tensor([0.0, 1.0, 0.0])})
    doc = run.json("diff", pa, pb, status=1)
    assert doc["tensors"][0]["rel_l2"] == "inf" and doc["tensors"][0]["max_abs"] == 1.0
    assert run("diff", pa, tmp_path / "missing")[0] == 2


@pytest.mark.parametrize("to", ["safetensors", "torch"])
def test_convert_round_trip(root, run, tmp_path, model_state, to):
    path = save_step(root, 1, model_state)
    out = tmp_path / f"weights.{to}"
    doc = run.json("convert", path, "--to", to, out, "--weights-only", "--prefix", "model.")
    assert doc["tensors"] == 3
    if to == "safetensors":
        from safetensors.torch import load_file
        loaded = load_file(str(out))
    else:
        loaded = torch.load(out, weights_only=True)
    assert sorted(loaded) == ["model.b", "model.layers.0.k", "model.w"]
    assert torch.equal(loaded["model.w"], model_state["model"]["w"])
    assert loaded["model.b"].dtype == torch.bfloat16
    assert torch.equal(loaded["model.b"], model_state["model"]["b"])
    status, _, err = run("convert", path, "--to", to, out)  # exists: refuse without --overwrite
    assert status == 1 and "FileExistsError" in err
    everything = run.json("convert", path, "--to", to, out, "--overwrite")
    assert everything["tensors"] == 3 and everything["key"] is None


def test_convert_key_and_errors(root, run, tmp_path, model_state):
    path = save_step(root, 1, model_state)
    out = tmp_path / "layer.pt"
    assert run.json("convert", path, "--to", "torch", out, "--key", "model/layers")[
        "tensors"] == 1
    assert list(torch.load(out, weights_only=True)) == ["0.k"]
    status, _, err = run("convert", path, "--to", "torch", tmp_path / "x.pt", "--key", "nope")
    assert status == 1 and "StateMismatchError" in err
    assert run("convert", path, "--to", "onnx", tmp_path / "y")[0] == 2
