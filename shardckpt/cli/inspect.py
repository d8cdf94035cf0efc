"""``shardckpt inspect CKPT``: every saved entry (tensors with their sharding, sizes and codecs;
plain values), the files and the user metadata. Reads only the manifest."""

from __future__ import annotations

import json

import numpy as np

from ..errors import CheckpointError
from ..format.tree import path_text
from . import common
from .output import Output, human_bytes

HELP = "list a checkpoint's tensors, values and metadata"


def register(sub, parent) -> None:
    """Add the ``inspect`` subcommand."""
    p = sub.add_parser("inspect", parents=[parent], help=HELP, description=HELP + ".")
    p.add_argument("path", help="the checkpoint folder or URL (or its manifest.json)")
    p.set_defaults(func=run)


def _tensor(m, entry) -> dict:
    raw, stored = common.entry_bytes(entry)
    used = np.unique(entry.chunks[:, 5]).tolist() if len(entry.chunks) else []
    return {"dtype": entry.dtype.name, "shape": list(entry.shape), "shards": len(entry.boxes),
            "chunks": len(entry.chunks), "raw_bytes": raw, "stored_bytes": stored,
            "codecs": [common.chain_text(m.codecs[i]) for i in used]}


def collect(args) -> dict:
    """The ``--json`` document of ``inspect``; ``path`` is the checkpoint folder, also when the
    command line named its ``manifest.json``.

    Raises:
        UsageError: ``args.path`` is a manager root or a folder of checkpoints (the message
            says so and names the command to run instead).
    """
    path, _ = common.manifest_folder(args.path)
    try:
        m = common.read_manifest(path, common.options_of(args))
    except CheckpointError:
        hint = common.where_checkpoints_are(path, common.options_of(args))
        if hint:
            raise common.UsageError(hint) from None
        raise
    raw, stored = common.total_bytes(m)
    overrides = {str(rank): [path_text(p) for p, _ in own]
                 for rank, own in (m.rank_overrides or ())}
    return {"path": path, "format_version": 1, "writer": m.writer,
            "created_unix": m.created_unix, "world_size": m.world_size,
            "files": [{"path": f.path, "bytes": f.size, "rank": f.rank, "base": f.base}
                      for f in m.files],
            "raw_bytes": raw, "stored_bytes": stored, "ratio": common.ratio(raw, stored),
            "tensors": {key: _tensor(m, e) for key, e in m.tensors.items()},
            "values": common.plain_values(m.tree), "per_rank_values": overrides,
            "metadata": m.metadata}


def run(args, out: Output) -> int:
    """Show the manifest; exit 0 (1 through the caller when it does not parse, 2 when the path
    is a manager root or a folder of checkpoints)."""
    doc = collect(args)
    if out.as_json:
        out.json(doc)
        return 0
    ratio = f"{doc['ratio']:.2f}x" if doc["ratio"] else "-"
    refs = sum(f["base"] is not None for f in doc["files"])
    out.line(f"{doc['path']}: format v1, saved by {doc['world_size']} rank(s) into "
             f"{len(doc['files'])} file(s)"
             + (f" ({refs} referenced in earlier checkpoints)" if refs else "") +
             f", {len(doc['tensors'])} tensors, "
             f"{human_bytes(doc['raw_bytes'])} raw, {human_bytes(doc['stored_bytes'])} stored "
             f"({ratio})")
    out.table(["tensor", "dtype", "shape", "shards", "raw", "stored", "codec"],
              [[k, t["dtype"], "x".join(map(str, t["shape"])) or "()", t["shards"],
                human_bytes(t["raw_bytes"]), human_bytes(t["stored_bytes"]),
                ", ".join(t["codecs"]) or "-"] for k, t in doc["tensors"].items()])
    if doc["values"]:
        out.table(["value", "saved"], [[k, repr(v)] for k, v in doc["values"].items()])
    for rank, paths in doc["per_rank_values"].items():
        out.line(f"rank {rank} saved its own values at: {', '.join(paths)}")
    out.line(f"metadata: {json.dumps(doc['metadata'], sort_keys=True)}")
    return 0
