"""What several subcommands share: the global options, and facts read from a manifest.

Nothing here reads tensor data; the subcommands do that through the library's read path.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from ..manage.manager import META_KEY
from ..format.opening import open_manifest
from ..storage import open_checkpoint, open_storage
from ..format.tree import dict_items, node_kind, path_text
from ..types import MANIFEST_NAME, Manifest, TensorEntry


class UsageError(Exception):
    """The command line asks for something it cannot do (exit status 2)."""


def storage_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with the value coerced: true/false, null, ints, floats, JSON objects and
    lists; anything else stays a string (argparse ``type=``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    if lowered in ("null", "none"):
        return key, None
    for convert in (int, float):
        try:
            return key, convert(raw)
        except ValueError:
            pass
    if raw[:1] in "[{\"":
        try:
            return key, json.loads(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{key}: bad JSON value: {exc}") from None
    return key, raw


_AGE = re.compile(r"(\d+(?:\.\d*)?)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def age(text: str) -> float:
    """``30s``, ``10m``, ``1h``, ``2d`` (or plain seconds) as seconds (argparse ``type=``)."""
    match = _AGE.fullmatch(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"expected an age like 30s, 10m, 1h or 2d, not {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def common_options() -> argparse.ArgumentParser:
    """The options every subcommand takes (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print one JSON document")
    parent.add_argument("--storage-option", "-o", metavar="KEY=VALUE", type=storage_option,
                        action="append", default=[], dest="storage_option",
                        help="passed to the storage backend (fsspec URLs); repeatable")
    return parent


def options_of(args) -> dict | None:
    """The ``storage_options`` dict of the parsed command line (None when empty)."""
    return dict(args.storage_option) or None


def read_manifest(path, storage_options: dict | None) -> Manifest:
    """The validated manifest of the checkpoint at ``path``."""
    storage, name = open_checkpoint(path, storage_options)
    return open_manifest(storage, name)


def entry_bytes(entry: TensorEntry) -> tuple[int, int]:
    """``(raw, stored)`` bytes of one tensor as saved (a replicated tensor counts once)."""
    return (int(entry.chunks[:, 4].sum()) * entry.dtype.itemsize, int(entry.chunks[:, 2].sum()))


def total_bytes(m: Manifest) -> tuple[int, int]:
    """``(raw, stored)`` bytes of every tensor of a checkpoint."""
    raw = stored = 0
    for entry in m.tensors.values():
        r, s = entry_bytes(entry)
        raw, stored = raw + r, stored + s
    return raw, stored


def ratio(raw: int, stored: int) -> float | None:
    """Compression ratio raw / stored (None for an empty checkpoint)."""
    return raw / stored if stored else None


def chain_text(chain) -> str:
    """A codec chain as ``shuffle(4)+zstd(1)``; ``raw`` for the empty chain."""
    parts = []
    for codec in chain:
        arg = codec.get("elementsize", codec.get("level"))
        parts.append(f"{codec.get('id')}({arg})" if arg is not None else str(codec.get("id")))
    return "+".join(parts) or "raw"


def manager_info(m: Manifest) -> dict:
    """The manager's record in the metadata (step, metrics, reason, unix_time), or {}."""
    info = m.metadata.get(META_KEY)
    return info if isinstance(info, dict) else {}


def disk_bytes(m: Manifest, manifest_size: int) -> int:
    """Bytes the committed checkpoint takes on storage: its data files and manifest (files it
    references in earlier checkpoints count there)."""
    return sum(f.size for f in m.files if f.base is None) + manifest_size


def manifest_size(storage, name: str) -> int:
    """Byte size of a checkpoint's manifest (0 when absent)."""
    try:
        return storage.size(f"{name}/{MANIFEST_NAME}")
    except OSError:
        return 0


def plain_values(tree) -> dict[str, object]:
    """``{key path: value}`` of every non-tensor leaf of a saved state tree."""
    out: dict[str, object] = {}

    def walk(node, path):
        kind, payload = node_kind(node)
        if kind == "dict":
            for k, child in dict_items(payload):
                walk(child, path + (k,))
        elif kind in ("list", "tuple"):
            for i, child in enumerate(payload):
                walk(child, path + (i,))
        elif kind == "float":
            out[path_text(path)] = float.fromhex(payload)
        elif kind != "tensor":
            out[path_text(path)] = payload  # int, str, bool, none (None), dtype (its name)
    walk(tree, ())
    return out


def _checkpoint_folders(storage, names) -> list[str]:
    """Of ``names`` under ``storage``, the folders that hold a manifest (a checkpoint each)."""
    return [n for n in names if storage.exists(f"{n}/{MANIFEST_NAME}")]


def where_checkpoints_are(path, storage_options: dict | None) -> str | None:
    """When ``path`` is not one checkpoint but holds some (a manager root, or a folder of
    checkpoints such as Lightning's ``dirpath``), a sentence saying so and what to run instead;
    None otherwise (then reading its manifest explains what is wrong)."""
    from ..manage import layout  # the root's names; only needed on this path
    try:
        storage = open_storage(path, storage_options)
        if not storage.exists("") or storage.exists(MANIFEST_NAME):
            return None
        names = storage.list("")
    except (OSError, ValueError):
        return None
    text = str(path).rstrip("/")
    steps = [e.name for e in layout.entries(storage) if e.committed]
    if steps:
        return (f"{path} is a manager root holding {len(steps)} committed checkpoint(s), not "
                f"one checkpoint: list them with `shardckpt ls {path}`, or inspect one, e.g. "
                f"`shardckpt inspect {text}/{steps[-1]}`")
    found = _checkpoint_folders(storage, sorted(names))
    if found:
        return (f"{path} is a folder of {len(found)} checkpoint(s) ({', '.join(found[:5])}"
                f"{', ...' if len(found) > 5 else ''}), not one checkpoint: inspect one, e.g. "
                f"`shardckpt inspect {text}/{found[-1]}`")
    return None


def manifest_folder(path) -> tuple[str, bool]:
    """``(checkpoint folder, whether path named its manifest.json)``: a path to a checkpoint's
    ``manifest.json`` stands for the checkpoint folder that holds it."""
    text = os.fspath(path)
    stripped = text.rstrip("/")
    if stripped.rsplit("/", 1)[-1] == MANIFEST_NAME:
        return stripped[:-len(MANIFEST_NAME)].rstrip("/") or ".", True
    return text, False
