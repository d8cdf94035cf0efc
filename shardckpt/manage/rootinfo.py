"""The manager's settings kept in its root, ``.manager.json``, for tools that read the root
without the training script: ``shardckpt ls`` ranks "best" by the manager's own ``monitor`` and
``mode`` (a metric where higher is better would otherwise be ranked backwards).

Rank 0 writes it when a manager opens the root with settings other than those stored,
atomically (layout.replace_file). A root made before this file existed has none; readers then
say the mode is assumed (``ls``: lower is better, as before).
"""

from __future__ import annotations

import json

from ..storage import Storage
from .layout import replace_file

INFO_NAME = ".manager.json"
FORMAT = 1


def read_info(storage: Storage) -> dict | None:
    """The stored ``{"monitor": str | None, "mode": "min" | "max"}``, or None when the root has
    none or it cannot be read or understood (an old root, another tool's file)."""
    try:
        doc = json.loads(storage.read(INFO_NAME))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("mode") not in ("min", "max") or \
            not isinstance(doc.get("monitor"), (str, type(None))):
        return None
    return {"monitor": doc["monitor"], "mode": doc["mode"]}


def write_info(storage: Storage, monitor: str | None, mode: str) -> None:
    """Store ``monitor`` and ``mode`` unless the root already holds them (one read, and a write
    only when they change)."""
    if read_info(storage) == {"monitor": monitor, "mode": mode}:
        return
    doc = {"format": FORMAT, "monitor": monitor, "mode": mode}
    replace_file(storage, INFO_NAME, json.dumps(doc).encode() + b"\n", "manager")
