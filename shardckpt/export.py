"""Weights-only export: consolidated files of plain tensors for deployment.

Exports just the tensors under one subtree of the saved state (by default ``model``), whole
whatever the saving world size was. Names are the key path joined by dots
(``layers.0.attn.weight``), optionally prefixed.

- ``export_weights(..., format="safetensors")``: one safetensors file, streamed from the
  checkpoint (the header comes from the manifest; tensors are read, written and dropped in
  order), so memory stays near the largest tensor. ``format="torch"``: a ``torch.save`` file
  (which needs every tensor in memory at once).
- ``export_hf``: the Hugging Face layout, ``model-0000k-of-0000n.safetensors`` files of at most
  ``max_shard_size`` plus ``model.safetensors.index.json``; memory is bounded by one output file.

Outputs are atomic: a temporary file or folder beside the destination, then a rename.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil

import torch

from .api import _subtree, load_full, saved_tree
from .errors import ExportError
from .read import open_for_read
from .tree import dict_items, node_kind
from . import safetensors_out

FORMATS = ("safetensors", "torch")
HF_INDEX = "model.safetensors.index.json"
DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def flat_tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{dotted.name: tensor}`` for every tensor in nested dicts / lists; other leaves dropped.
    A tensor reached twice (tied weights) appears under both names as separate copies, since
    deployment formats do not share memory between names."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(v, name):
        if isinstance(v, torch.Tensor):
            out[name] = v.clone() if id(v) in seen else v
            seen.add(id(v))
        elif isinstance(v, dict):
            for k, child in v.items():
                walk(child, f"{name}.{k}" if name else str(k))
        elif isinstance(v, (list, tuple)):
            for i, child in enumerate(v):
                walk(child, f"{name}.{i}" if name else str(i))
    walk(value, prefix.rstrip("."))
    return out


def export_weights(path, dest, *, format: str = "safetensors", key: str | None = "model",
                   prefix: str = "", storage_options: dict | None = None) -> dict:
    """Write the tensors under ``key`` of the checkpoint at ``path`` to the file ``dest``.

    Args:
        format: ``"safetensors"`` (needs the safetensors package) or ``"torch"``.
        key: the subtree holding the weights (``/``-separated); None exports every tensor.
        prefix: prepended to every name (``"model."``).

    Returns:
        ``{"tensors": count, "bytes": total}``.

    Raises:
        StateMismatchError: the checkpoint has no ``key``. CheckpointError: as ``load``.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    if format == "safetensors":
        return _stream_one_file(path, os.fspath(dest), key, prefix, storage_options)
    value = load_full(path, key=key, storage_options=storage_options)
    if isinstance(value, torch.Tensor):
        value = {"weight": value}
    tensors = flat_tensors(value, prefix.rstrip(".") if prefix else "")
    dest = os.fspath(dest)
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, dest)  # a reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size()
                                                  for t in tensors.values())}


def tensor_names(node, prefix: str = "") -> dict[str, str]:
    """``{dotted.name: manifest key}`` for every tensor leaf of a saved tree node.

    Raises:
        ExportError: two different tensors get the same name (``{"a.b": x, "a": {"b": y}}``).
    """
    out: dict[str, str] = {}

    def walk(n, name):
        kind, payload = node_kind(n)
        if kind == "tensor":
            if name in out and out[name] != payload:
                raise ExportError(f"two tensors export under the name {name!r} "
                                  f"(keys {out[name]!r} and {payload!r}); rename one")
            out[name] = payload
        elif kind == "dict":
            for k, child in dict_items(payload):
                walk(child, f"{name}.{k}" if name else str(k))
        elif kind in ("list", "tuple"):
            for i, child in enumerate(payload):
                walk(child, f"{name}.{i}" if name else str(i))
    walk(node, prefix.rstrip("."))
    if "" in out:  # the subtree is one bare tensor
        out["weight"] = out.pop("")
    return out


def _plan(path, key, prefix, storage_options, dtype=None):
    """(manifest, data paths, output items) of an export."""
    m, paths = open_for_read(path, storage_options)
    names = tensor_names(_subtree(saved_tree(m, 0), key), prefix)
    return m, paths, safetensors_out.make_items(m, names, dtype)


def _stream_one_file(path, dest: str, key, prefix, storage_options) -> dict:
    m, paths, items = _plan(path, key, prefix, storage_options)
    tmp = f"{dest}.tmp-{secrets.token_hex(4)}"
    try:
        total = safetensors_out.write_file(tmp, m, paths, items)
        os.replace(tmp, dest)  # a reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"tensors": len(items), "bytes": total}


def parse_size(text) -> int:
    """Bytes of ``5GB`` / ``500MB`` / ``10KiB`` / ``1234`` (decimal units, binary with ``i``)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(text), re.I)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 64MiB)")
    number, unit, binary = match.groups()
    scale = (1024 if binary else 1000) ** " kmgt".index(unit.lower() or " ")
    return int(float(number) * scale)


def export_hf(path, out_dir, *, key: str | None = "model", max_shard_size="5GB",
              dtype=None, prefix: str = "", config=None, overwrite: bool = False,
              storage_options: dict | None = None) -> dict:
    """Write the ``key`` subtree of the checkpoint at ``path`` in the Hugging Face layout.

    ``out_dir`` receives ``model-0000k-of-0000n.safetensors`` files and
    ``model.safetensors.index.json`` (``from_pretrained`` and ``safetensors`` load them). Each
    output file is read from the checkpoint, written and released before the next, so memory
    is bounded by one output file. The folder appears whole or not at all.

    Args:
        max_shard_size: bytes per output file (``"5GB"``, ``"200MB"`` or an int); a tensor
            larger than that gets a file of its own.
        dtype: ``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or a torch dtype): cast floating tensors;
            int and bool tensors keep theirs.
        config: a ``config.json`` to place beside the weights (a dict, or a file path).
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``{"tensors", "bytes", "files", "out"}``.

    Raises:
        ExportError: a name collision or a dtype safetensors cannot hold.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        CheckpointError: as ``load``.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, not {dtype!r}")
        dtype = DTYPE_NAMES[dtype.lower()]
    m, paths, items = _plan(path, key, prefix, storage_options, dtype)
    groups = safetensors_out.split(items, parse_size(max_shard_size))
    tmp = os.path.join(os.path.dirname(out_dir),
                       f".{os.path.basename(out_dir)}.tmp-{secrets.token_hex(4)}")
    os.makedirs(tmp)
    try:
        total, weight_map = _write_groups(tmp, m, paths, groups)
        _write_json(os.path.join(tmp, HF_INDEX),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        if config is not None:
            _write_config(tmp, config)
        _replace_dir(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return {"tensors": len(items), "bytes": total, "files": len(groups), "out": out_dir}


def _write_groups(folder: str, m, paths, groups) -> tuple[int, dict]:
    total, weight_map = 0, {}
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        total += safetensors_out.write_file(os.path.join(folder, fname), m, paths, group)
        weight_map.update((item.name, fname) for item in group)
    return total, weight_map


def _write_json(dest: str, doc: dict) -> None:
    with open(dest, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def _write_config(folder: str, config) -> None:
    if not isinstance(config, dict):
        with open(config) as fh:
            config = json.load(fh)
    _write_json(os.path.join(folder, "config.json"), config)


def _replace_dir(tmp: str, dest: str) -> None:
    """Move the finished folder into place; an old one is moved aside first, then removed."""
    old = None
    if os.path.exists(dest):
        old = f"{tmp}.old"
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(os.path.dirname(dest), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
