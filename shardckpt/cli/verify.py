"""``shardckpt verify CKPT``: read every chunk and check its checksum and decoding; report every
fault (file, tensor, chunk), not just the first. Exit 0 when sound, 1 when not."""

from __future__ import annotations

import sys

from .. import codecs
from ..api import verify
from . import common
from .output import Output, human_bytes

HELP = "check every checksum of a checkpoint"


def register(sub, parent) -> None:
    """Add the ``verify`` subcommand."""
    p = sub.add_parser("verify", parents=[parent], help=HELP, description=HELP + ".")
    p.add_argument("path", help="the checkpoint folder or URL")
    p.add_argument("--threads", type=int, default=None, help="decoding threads (default: all)")
    p.set_defaults(func=run)


def _problem(exc) -> dict:
    return {"error": type(exc).__name__, "message": str(exc),
            "file": getattr(exc, "file", None), "tensor": getattr(exc, "tensor", None),
            "chunk": getattr(exc, "chunk", None)}


def collect(args, advance=None) -> dict:
    """The ``--json`` document of ``verify``."""
    report = verify(args.path, threads=args.threads, storage_options=common.options_of(args),
                    collect=True, progress=advance)
    return {"path": args.path, "ok": report.ok, "tensors": report.tensors,
            "chunks": report.chunks, "raw_bytes": report.raw_bytes,
            "stored_bytes": report.stored_bytes, "backend": codecs.BACKEND,
            "problems": [_problem(p) for p in report.problems]}


def run(args, out: Output) -> int:
    """Verify; exit 0 when every check passed, 1 otherwise."""
    options = common.options_of(args)
    _, stored = common.total_bytes(common.read_manifest(args.path, options))
    with out.progress("verifying", stored) as advance:
        doc = collect(args, advance)
    if out.as_json:
        out.json(doc)
    elif doc["ok"]:
        out.line(f"OK {doc['path']}: {doc['tensors']} tensors, {doc['chunks']} chunks, "
                 f"{human_bytes(doc['raw_bytes'])} raw, {human_bytes(doc['stored_bytes'])} "
                 f"stored (codec backend: {doc['backend']})")
    else:
        out.line(f"FAILED {doc['path']}: {len(doc['problems'])} problem(s)")
        out.table(["file", "tensor", "chunk", "error"],
                  [[p["file"] or "-", p["tensor"] or "-", "-" if p["chunk"] is None else p["chunk"],
                    p["message"]] for p in doc["problems"]])
    if not doc["ok"]:
        kinds = sorted({p["error"] for p in doc["problems"]})
        print(f"shardckpt: {'/'.join(kinds)}: {len(doc['problems'])} problem(s) in {args.path}; "
              f"first: {doc['problems'][0]['message']}", file=sys.stderr)
    return 0 if doc["ok"] else 1
