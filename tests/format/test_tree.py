"""The state tree (tree.py): keys, saving a memory view once, and the one-walk split the plan
round uses."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from shardckpt.errors import UnsupportedValueError
from shardckpt.format.tree import build, flatten, flatten_split, split_values


def _states():
    leaf = st.one_of(
        st.integers(-2**63, 2**63), st.floats(allow_nan=False), st.text(max_size=6),
        st.booleans(), st.none(), st.just(torch.float16), st.just(torch.Size([2, 3])),
        st.binary(max_size=4), st.integers(0, 3).map(lambda n: torch.arange(n + 1.0)))
    key = st.one_of(st.text(alphabet="ab/~", min_size=1, max_size=3), st.integers(-2, 2))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(key, inner, max_size=3)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=_states())
def test_the_one_walk_split_equals_flatten_then_split(state):
    tree, items = flatten(state)
    skeleton, values, split_items = flatten_split(state)
    assert (skeleton, values) == split_values(tree)
    assert [i.key for i in split_items] == [i.key for i in items]
    assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(items, split_items))


def test_keys_are_escaped_paths_and_a_view_of_the_same_memory_is_saved_once():
    w = torch.arange(12.0).reshape(3, 4)
    state = {"a/b": {"x~": w}, "alias": w, "view": w[1:], "t": w.t(), "step": 3,
             "blob": b"\x00\x01", "io": io.BytesIO(b"z"), "size": torch.Size([1])}
    tree, items = flatten(state)
    keys = [i.key for i in items]
    assert keys == ["a~1b/x~0", "view", "t", "blob", "io"]  # alias is the first key again
    values = build(tree, {i.key: i.tensor for i in items}.__getitem__,
                   blob=lambda k: bytes(next(i for i in items if i.key == k).tensor.numpy()))
    assert values["alias"] is w and values["step"] == 3 and values["size"] == torch.Size([1])
    assert values["blob"] == b"\x00\x01" and values["io"].getvalue() == b"z"
    assert torch.equal(values["t"], w.t()) and torch.equal(values["view"], w[1:])


def test_errors_name_the_escaped_path():
    with pytest.raises(UnsupportedValueError, match=r"^m~1n/0: cannot save a object"):
        flatten({"m/n": [object()]})
    with pytest.raises(UnsupportedValueError, match=r"^<root>: dict key"):
        flatten({(1, 2): 0})
    with pytest.raises(UnsupportedValueError, match=r"^q: cannot save a torch.sparse_coo"):
        flatten({"q": torch.eye(2).to_sparse()})
