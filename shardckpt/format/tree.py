"""The state tree: nested containers of tensors and plain values <-> JSON nodes (FORMAT.md 3.4).

``flatten`` turns a user's state into a JSON tree whose tensor leaves name entries of the
manifest's tensor table, plus the list of tensors to save. ``build`` turns a tree back into Python
values. Nothing here pickles: only the node kinds of FORMAT.md exist. ``bytes`` and
``io.BytesIO`` values (revision 1.2) are saved as 1-D uint8 tensors that their own node kinds
name, so a reader hands them back as bytes without ever interpreting them.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any, Callable

import torch

from . import grid
from ..errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedValueError
from ..types import DTYPE_BY_TORCH, DTYPES, TensorItem

MAX_DEPTH = 512


def is_stateful(obj) -> bool:
    """True for objects saved through ``state_dict()`` and restored by ``load_state_dict()``."""
    return (not isinstance(obj, (dict, torch.Tensor)) and callable(getattr(obj, "state_dict", None))
            and callable(getattr(obj, "load_state_dict", None)))


def escape(segment) -> str:
    """One key-path segment as FORMAT.md 3.3 writes it."""
    text = str(segment)
    if "~" in text or "/" in text:
        return text.replace("~", "~0").replace("/", "~1")
    return text


def path_text(path) -> str:
    """A key path as text (FORMAT.md 3.3 escaping), ``<root>`` for the empty path."""
    return "/".join(escape(s) for s in path) or "<root>"


def dtensor_type():
    """``DTensor``, or None where torch has no distributed tensors or they were never imported
    (then no value can be one; importing them costs ~40 MiB of modules a save has no use for)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


# A DTensor's offsets are a function of its mesh, placements and global shape. torch computes
# them in ~40 us per tensor, which adds up to a visible stall for a model saved every few
# steps; the layout rarely changes between saves, so it is computed once per layout.
_OFFSETS: dict = {}


def local_box(t: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple, bool]:
    """``(local tensor, global shape, offsets, is_dtensor)`` of a tensor or DTensor."""
    dt = dtensor_type()
    if dt is not None and isinstance(t, dt):
        local, shape = t.to_local(), tuple(t.shape)
        layout = (t.device_mesh, t.placements, shape, tuple(local.shape))
        offsets = _OFFSETS.get(layout)
        if offsets is None:
            box = t.__create_chunk_list__()[0]  # raises for Partial placements
            if len(_OFFSETS) > 100_000:
                _OFFSETS.clear()
            offsets = _OFFSETS[layout] = tuple(box.offsets)
        return local, shape, offsets, True
    return t, tuple(t.shape), (0,) * t.dim(), False


_RULES: dict = {}


def _rule(t, offsets: tuple, local_shape: tuple) -> str | None:
    """DTensor ``t``'s grid rule as JSON text (grid.py), cached per layout like its offsets."""
    layout = (t.device_mesh, t.placements, tuple(t.shape), local_shape)
    if layout not in _RULES:
        if len(_RULES) > 100_000:
            _RULES.clear()
        rule = grid.rule_of(t, offsets, local_shape)
        _RULES[layout] = None if rule is None else json.dumps(rule, separators=(",", ":"))
    return _RULES[layout]


def _storage_identity(t: torch.Tensor):
    """Tensors equal under this key are the same view of the same memory: saved once. (The
    address of the first element stands for the storage and the offset in it: with the dtype,
    shape and strides equal, equal addresses mean the same elements.)"""
    if t.numel() == 0:
        return None
    return t.device, t.data_ptr(), t.shape, t.stride(), t.dtype


def _child(prefix: str, segment) -> str:
    """The escaped key path of a container's member, from its container's."""
    return f"{prefix}/{escape(segment)}" if prefix else escape(segment)


class Flattener:
    """Walks a state once. A node's position is carried as its escaped key path (FORMAT.md
    3.3), built one segment at a time: the path of a tensor is its key."""

    def __init__(self, values: list | None = None):
        self.items: list[TensorItem] = []
        self.keys: set[str] = set()
        self.by_identity: dict = {}
        self.dtensor = dtensor_type()
        self.values = values  # when a list: leaves go there, the tree gets placeholders

    def leaf(self, node: dict) -> dict:
        """A non-tensor leaf, or its ``{"value": i}`` placeholder (see ``split_values``)."""
        if self.values is None:
            return node
        self.values.append(node)
        return {"value": len(self.values) - 1}

    def unique_key(self, base: str) -> str:
        key, n = base, 1
        while key in self.keys:
            n += 1
            key = f"{base}~{n}"
        self.keys.add(key)
        return key

    def tensor(self, t: torch.Tensor, prefix: str) -> dict:
        # The hot path of a save's stall (a model has hundreds of tensors): no work here that
        # only an error message needs.
        if t.layout != torch.strided or t.is_quantized or t.is_meta:
            raise UnsupportedValueError(f"{prefix or '<root>'}: cannot save a {t.layout} / "
                                        f"{t.device.type} tensor (only dense, materialized "
                                        "tensors)")
        if t.dtype not in DTYPE_BY_TORCH:
            raise UnsupportedValueError(f"{prefix or '<root>'}: dtype {t.dtype} is not in "
                                        "format v1")
        if t.requires_grad:
            t = t.detach()
        if self.dtensor is not None and isinstance(t, self.dtensor):
            local, global_shape, offsets, is_dtensor = local_box(t)
        else:
            local, global_shape, offsets, is_dtensor = t, tuple(t.shape), (0,) * t.dim(), False
        ident = _storage_identity(local)
        if ident is not None and ident in self.by_identity:
            return {"tensor": self.by_identity[ident]}
        key = self.unique_key(prefix)
        rule = _rule(t, offsets, tuple(local.shape)) if is_dtensor else None
        self.items.append(TensorItem(key, local, global_shape, offsets, is_dtensor, rule))
        if ident is not None:
            self.by_identity[ident] = key
        return {"tensor": key}

    def blob(self, data: bytes, kind: str, prefix: str) -> dict:
        """A bytes-like value as a uint8 tensor of its own (FORMAT.md 3.4, revision 1.2)."""
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
            torch.empty(0, dtype=torch.uint8)
        key = self.unique_key(prefix)
        self.items.append(TensorItem(key, t, tuple(t.shape), (0,), False))
        return {kind: key}

    def node(self, obj, prefix: str = "", depth: int = 0) -> dict:
        """The tree node of ``obj`` found at the escaped key path ``prefix``."""
        if depth > MAX_DEPTH:
            raise UnsupportedValueError(f"state nested deeper than {MAX_DEPTH} levels")
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, prefix)
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise UnsupportedValueError(
                        f"{prefix or '<root>'}: dict key {k!r} is not a str or int")
                items.append([k, self.node(v, _child(prefix, k), depth + 1)])
            return {"dict": items}
        if isinstance(obj, torch.Size):  # a tuple, saved as its own kind
            return self.leaf({"size": [int(d) for d in obj]})
        if isinstance(obj, (list, tuple)):
            kind = "tuple" if isinstance(obj, tuple) else "list"
            return {kind: [self.node(v, _child(prefix, i), depth + 1)
                           for i, v in enumerate(obj)]}
        if isinstance(obj, bool):
            return self.leaf({"bool": obj})
        if isinstance(obj, int):
            return self.leaf({"int": int(obj)})
        if isinstance(obj, float):
            return self.leaf({"float": float(obj).hex()})
        if isinstance(obj, str):
            return self.leaf({"str": obj})
        if obj is None:
            return self.leaf({"none": None})
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return self.blob(bytes(obj), "bytes", prefix)
        if isinstance(obj, io.BytesIO):
            return self.blob(obj.getvalue(), "bytesio", prefix)
        if isinstance(obj, torch.dtype):
            if obj not in DTYPE_BY_TORCH:
                raise UnsupportedValueError(f"{prefix or '<root>'}: dtype {obj}")
            return self.leaf({"dtype": DTYPE_BY_TORCH[obj].name})
        if is_stateful(obj):
            return self.node(obj.state_dict(), prefix, depth + 1)
        raise UnsupportedValueError(
            f"{prefix or '<root>'}: cannot save a {type(obj).__name__} "
            "without pickling; convert it to tensors, numbers, strings, lists or dicts")


def flatten(state) -> tuple[dict, list[TensorItem]]:
    """``(tree, tensors)`` of a state; raises UnsupportedValueError naming the path of a value
    that cannot be saved."""
    f = Flattener()
    return f.node(state), f.items


def flatten_split(state) -> tuple[dict, list, list[TensorItem]]:
    """``(skeleton, values, tensors)``: ``flatten`` and ``split_values`` in one walk."""
    f = Flattener(values=[])
    return f.node(state), f.values, f.items


def _scalar(kind: str, value):
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, str):
        try:
            return float.fromhex(value)  # also reads "inf", "-inf" and "nan"
        except (ValueError, OverflowError):  # "0x1p+99999" overflows
            pass
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "none" and value is None:
        return None
    if kind == "dtype" and value in DTYPES:
        return DTYPES[value].torch
    if kind == "size" and isinstance(value, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        return torch.Size(value)
    if kind not in KNOWN_KINDS:
        raise UnsafeCheckpointError(f"manifest.json: unknown node kind {kind!r:.40} in the state "
                                    "tree (written by a newer format revision?); refusing to "
                                    "guess what it holds")
    raise CorruptCheckpointError(f"bad {kind} node in the state tree: {value!r}",
                                 file="manifest.json")


def node_kind(node) -> tuple[str, Any]:
    """``(kind, payload)`` of a tree node; refuses anything but a one-key object."""
    if not isinstance(node, dict) or len(node) != 1:
        raise CorruptCheckpointError(f"state tree node is not a one-key object: {node!r:.200}",
                                     file="manifest.json")
    return next(iter(node.items()))


def dict_items(payload) -> list[tuple]:
    """The ``(key, node)`` pairs of a dict node, checked."""
    if not isinstance(payload, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int))
            and not isinstance(p[0], bool) for p in payload):
        raise CorruptCheckpointError("bad dict node in the state tree", file="manifest.json")
    return [tuple(p) for p in payload]


def _no_blob(key: str):
    raise UnsupportedValueError(f"{key}: a bytes value, which this caller cannot read")


def build(node, tensor: Callable[[str], Any], depth: int = 0,
          blob: Callable[[str], bytes] = _no_blob):
    """The Python value of a tree; ``tensor(key)`` supplies each tensor leaf and ``blob(key)``
    the bytes of each ``bytes`` / ``bytesio`` leaf (read at once: bytes cannot be filled
    later)."""
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError("state tree nested too deeply", file="manifest.json")
    kind, payload = node_kind(node)
    if kind == "tensor":
        return tensor(payload)
    if kind in BLOB_KINDS:
        data = blob(payload)
        return io.BytesIO(data) if kind == "bytesio" else data
    if kind == "dict":
        return {k: build(v, tensor, depth + 1, blob) for k, v in dict_items(payload)}
    if kind in ("list", "tuple"):
        if not isinstance(payload, list):
            raise CorruptCheckpointError(f"bad {kind} node in the state tree",
                                         file="manifest.json")
        values = [build(v, tensor, depth + 1, blob) for v in payload]
        return values if kind == "list" else tuple(values)
    return _scalar(kind, payload)


def tensor_keys(node, depth: int = 0):
    """Every tensor key the tree names (with repeats)."""
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError("state tree nested too deeply", file="manifest.json")
    kind, payload = node_kind(node)
    if kind == "tensor" or kind in BLOB_KINDS:
        if not isinstance(payload, str):
            raise CorruptCheckpointError(f"tensor node names {payload!r:.40}, not a key",
                                         file="manifest.json")
        yield payload
    elif kind == "dict":
        for _, v in dict_items(payload):
            yield from tensor_keys(v, depth + 1)
    elif kind in ("list", "tuple") and isinstance(payload, list):
        for v in payload:
            yield from tensor_keys(v, depth + 1)



LEAF_KINDS = ("int", "float", "str", "bool", "none", "dtype", "size")
BLOB_KINDS = ("bytes", "bytesio")  # name a 1-D uint8 tensor of the tensor table
KNOWN_KINDS = LEAF_KINDS + BLOB_KINDS + ("tensor", "dict", "list", "tuple")


def split_values(node) -> tuple[dict, list]:
    """``(skeleton, values)``: the tree with each non-tensor leaf replaced by ``{"value": i}``,
    and those leaves in order. Ranks' skeletons are usually equal even where values differ."""
    values: list = []

    def walk(n):
        kind, payload = node_kind(n)
        if kind in LEAF_KINDS:
            values.append(n)
            return {"value": len(values) - 1}
        if kind == "dict":
            return {"dict": [[k, walk(v)] for k, v in payload]}
        if kind in ("list", "tuple"):
            return {kind: [walk(v) for v in payload]}
        return n
    return walk(node), values


def fill_values(skeleton, values: list | None) -> tuple[dict, dict, dict, dict]:
    """``(tree, value_paths, tensor_paths, tensor_kinds)``: the skeleton with its values put
    back (left as placeholders when ``values`` is None), the path of each value by index, the
    path of each tensor key's first leaf, and the node kind naming each key (``tensor``, or
    ``bytes`` / ``bytesio`` for a bytes value)."""
    value_paths: dict = {}
    tensor_paths: dict = {}
    tensor_kinds: dict = {}

    def walk(n, path):
        kind, payload = node_kind(n)
        if kind == "value":
            value_paths[payload] = list(path)
            return n if values is None else values[payload]
        if kind == "tensor" or kind in BLOB_KINDS:
            tensor_paths.setdefault(payload, list(path))
            tensor_kinds.setdefault(payload, kind)
            return n
        if kind == "dict":
            return {"dict": [[k, walk(v, path + (k,))] for k, v in payload]}
        return {kind: [walk(v, path + (i,)) for i, v in enumerate(payload)]}
    return walk(skeleton, ()), value_paths, tensor_paths, tensor_kinds


def with_overrides(node, overrides: list):
    """A copy of a tree with ``[path, node]`` overrides applied (paths from the root)."""
    for path, value in overrides:
        node = _replace(node, list(path), value)
    return node


def _replace(node, path: list, value):
    if not path:
        return value
    kind, payload = node_kind(node)
    head = path[0]
    if kind == "dict":
        items = dict_items(payload)
        if head not in (k for k, _ in items):
            raise CorruptCheckpointError(f"per-rank override names a missing key {head!r}",
                                         file="manifest.json")
        return {"dict": [[k, _replace(v, path[1:], value) if k == head else v]
                         for k, v in items]}
    if kind in ("list", "tuple") and isinstance(payload, list) and isinstance(head, int) \
            and not isinstance(head, bool) and 0 <= head < len(payload):
        return {kind: [_replace(v, path[1:], value) if i == head else v
                       for i, v in enumerate(payload)]}
    raise CorruptCheckpointError(f"per-rank override path step {head!r} does not exist",
                                 file="manifest.json")
