"""Weights-only export: one consolidated file of plain tensors for deployment.

Reads just the tensors under one subtree of the saved state (by default ``model``), whole and on
the CPU whatever the saving world size was, and writes them as a safetensors file or a
``torch.save`` file of a flat ``{name: tensor}`` dict. Names are the key path joined by dots
(``layers.0.attn.weight``), optionally prefixed.
"""

from __future__ import annotations

import os

import torch

from .api import load_full

FORMATS = ("safetensors", "torch")


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
    value = load_full(path, key=key, storage_options=storage_options)
    if isinstance(value, torch.Tensor):
        value = {"weight": value}
    tensors = flat_tensors(value, prefix.rstrip(".") if prefix else "")
    dest = os.fspath(dest)
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        if format == "safetensors":
            from safetensors.torch import save_file
            save_file({k: t.contiguous() for k, t in tensors.items()}, tmp)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, dest)  # a reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size()
                                                  for t in tensors.values())}
