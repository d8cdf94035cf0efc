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

Outputs are atomic: a temporary file or folder beside the destination, then a rename. An output
is never the checkpoint it is read from (nor inside it, nor holding one of its files), and
``overwrite`` replaces only an earlier export or an empty folder: a careless path must not delete
the checkpoint or a root of them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil

import torch

from ..api import load_full
from ..load import saved_tree, subtree
from ..errors import CheckpointExistsError, ExportError
from ..format.opening import open_for_read
from ..storage import open_checkpoint
from ..format.tree import dict_items, node_kind
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
    dest = os.fspath(dest)
    _refuse_overlap(dest, path, storage_options, open_for_read(path, storage_options)[1])
    value = load_full(path, key=key, storage_options=storage_options)
    if isinstance(value, torch.Tensor):
        value = {"weight": value}
    tensors = flat_tensors(value, prefix.rstrip(".") if prefix else "")
    tmp = f"{dest}.tmp-{secrets.token_hex(4)}"
    try:
        with open(tmp, "xb") as fh:  # exclusive: never through a link planted under that name
            torch.save(tensors, fh)
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
    if "" in out:  # the subtree is one bare tensor (or a tensor under the key "")
        if "weight" in out:
            raise ExportError(f"two tensors export under the name 'weight' (keys "
                              f"{out['weight']!r} and {out['']!r}); rename one")
        out["weight"] = out.pop("")
    return out


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _refuse_overlap(dest: str, path, storage_options, sources: list) -> None:
    """Refuse an output ``dest`` that lies inside the checkpoint at ``path``, or is or holds
    the checkpoint or one of its data files (``sources``, as ``open_for_read`` gives them: a
    reference lives in a sibling checkpoint): replacing it would destroy what the export reads.

    Raises:
        ExportError: naming both.
    """
    storage, name = open_checkpoint(path, storage_options)
    folder = storage.local_path(name)
    if folder is None:
        return
    real, folder = os.path.realpath(dest), os.path.realpath(folder)
    used = [folder] + [os.path.realpath(p) for p in sources if isinstance(p, str)]
    if _inside(real, folder) or any(_inside(p, real) for p in used):
        raise ExportError(f"{dest}: the output would overwrite the checkpoint it is read from "
                          f"({folder}) or a file it uses; pick another path")


def _refuse_to_replace(out_dir: str, overwrite: bool) -> None:
    """An existing ``out_dir`` may be replaced only with ``overwrite`` and only when it is empty
    or an earlier export (it holds ``model.safetensors.index.json``): the whole folder goes.

    Raises:
        CheckpointExistsError (a FileExistsError): naming the folder.
    """
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise CheckpointExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    if not os.path.isdir(out_dir) or os.path.islink(out_dir) or (
            os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, HF_INDEX))):
        raise CheckpointExistsError(f"{out_dir}: not an earlier export (no {HF_INDEX}); "
                                    "refusing to replace it, which would delete it all")


def _plan(path, key, prefix, storage_options, dtype=None):
    """(manifest, data paths, output items) of an export."""
    m, paths = open_for_read(path, storage_options)
    names = tensor_names(subtree(saved_tree(m, 0), key), prefix)
    return m, paths, safetensors_out.make_items(m, names, dtype)


def _stream_one_file(path, dest: str, key, prefix, storage_options) -> dict:
    m, paths, items = _plan(path, key, prefix, storage_options)
    _refuse_overlap(dest, path, storage_options, paths)
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
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"not a size: {text!r} (negative)")
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
        ExportError: a name collision or a dtype safetensors cannot hold, ``out_dir`` is,
            holds or lies inside the checkpoint, or ``config`` is no JSON object.
        ValueError: ``dtype`` is not floating, ``max_shard_size`` is not a size.
        CheckpointExistsError (a FileExistsError): ``out_dir`` exists and ``overwrite`` is
            false, or it is neither empty nor an earlier export.
        CheckpointError: as ``load``.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    _refuse_to_replace(out_dir, overwrite)
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, not {dtype!r}")
        dtype = DTYPE_NAMES[dtype.lower()]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating dtype (weights are cast to it), not {dtype!r}")
    limit = parse_size(max_shard_size)
    config = _read_config(config) if config is not None else None  # before any work
    m, paths, items = _plan(path, key, prefix, storage_options, dtype)
    _refuse_overlap(out_dir, path, storage_options, paths)
    groups = safetensors_out.split(items, limit)
    tmp = os.path.join(os.path.dirname(out_dir),
                       f".{os.path.basename(out_dir)}.tmp-{secrets.token_hex(4)}")
    os.makedirs(tmp)
    try:
        total, weight_map = _write_groups(tmp, m, paths, groups)
        _write_json(os.path.join(tmp, HF_INDEX),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        if config is not None:
            _write_json(os.path.join(tmp, "config.json"), config)
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


def _read_config(config) -> dict:
    """``config`` as a dict: itself, or the JSON object in the file it names.

    Raises:
        ExportError: not a dict or a readable file holding a JSON object (naming it).
    """
    if isinstance(config, dict):
        return config
    if not isinstance(config, (str, os.PathLike)):
        raise ExportError(f"config must be a dict or a path to a JSON file, not {config!r:.80}")
    try:
        with open(config) as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ExportError(f"config {os.fspath(config)!r}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ExportError(f"config {os.fspath(config)!r} holds no JSON object")
    return doc


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
