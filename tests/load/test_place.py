"""Loading into a state that does not match: every difference reported at once, nothing touched."""

import pytest
import torch

import shardckpt
from shardckpt.errors import StateMismatchError


@pytest.fixture
def saved(ckpt):
    shardckpt.save({"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.ones(2),
                    "n": {"x": 1}, "seq": [1, 2]}, ckpt)
    return ckpt


def test_all_mismatches_listed_at_once_and_target_untouched(saved):
    target = {"a": torch.zeros(3, 2), "b": torch.zeros(4, dtype=torch.float64),
              "d": torch.zeros(1), "n": {"x": 0}, "seq": [0, 0, 0]}
    with pytest.raises(StateMismatchError) as info:
        shardckpt.load(target, saved)
    err = info.value
    assert err.missing == ["d"] and err.unexpected == ["c"]
    assert {k for k, _ in err.mismatched} == {"a", "b", "seq"}
    assert all(not t.any() for t in (target["a"], target["b"], target["d"]))
    assert target["n"] == {"x": 0}  # nothing assigned before the error


def test_non_strict_ignores_missing_and_unexpected(saved):
    target = {"a": torch.zeros(2, 3), "d": torch.zeros(1)}
    shardckpt.load(target, saved, strict=False)
    assert torch.equal(target["a"], torch.ones(2, 3)) and not target["d"].any()


def test_module_with_extra_checkpoint_keys_is_a_mismatch(ckpt):
    shardckpt.save({"m": torch.nn.Linear(2, 2)}, ckpt)
    with pytest.raises(StateMismatchError) as info:
        shardckpt.load({"m": torch.nn.Linear(2, 2, bias=False)}, ckpt)
    assert info.value.unexpected == ["m/bias"]


def test_unsupported_values_are_named(ckpt):
    with pytest.raises(shardckpt.UnsupportedValueError, match="opt/thing"):
        shardckpt.save({"opt": {"thing": object()}}, ckpt)
    with pytest.raises(shardckpt.UnsupportedValueError, match="sparse"):
        shardckpt.save({"s": torch.eye(3).to_sparse()}, ckpt)
    assert not ckpt.exists()


def test_load_into_tensors_on_other_layouts(ckpt):
    src = torch.arange(12.0).reshape(3, 4)
    shardckpt.save({"x": src}, ckpt)
    target = {"x": torch.zeros(4, 3).t()}  # non-contiguous destination
    shardckpt.load(target, ckpt)
    assert torch.equal(target["x"], src)


def test_parameters_load_without_autograd_errors(ckpt):
    shardckpt.save({"p": torch.nn.Parameter(torch.ones(3))}, ckpt)
    p = torch.nn.Parameter(torch.zeros(3))
    shardckpt.load({"p": p}, ckpt)
    assert torch.equal(p.detach(), torch.ones(3)) and p.requires_grad
