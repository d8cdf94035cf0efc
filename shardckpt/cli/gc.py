"""``shardckpt gc ROOT``: remove what interrupted saves left under a manager root.

The rules live in ``shardckpt.manage.layout.collect_garbage`` (shared with
``CheckpointManager.cleanup``); this module parses the arguments and shows the outcome.
"""

from __future__ import annotations

from ..errors import CheckpointNotFoundError
from ..manage.layout import collect_garbage
from ..storage import open_storage
from . import common
from .output import Output, human_bytes

HELP = "remove leftovers of interrupted saves (never a committed checkpoint)"


def register(sub, parent) -> None:
    """Add the ``gc`` subcommand."""
    p = sub.add_parser("gc", parents=[parent], help=HELP, description=HELP + ".")
    p.add_argument("root", help="the manager's root folder or URL")
    p.add_argument("--older-than", type=common.age, default=3600.0, metavar="AGE",
                   help="only leftovers untouched this long: 30s, 10m, 1h (default), 2d")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(func=run)


def collect(args) -> dict:
    """Decide, remove (unless --dry-run), and return the ``--json`` document of ``gc``."""
    storage = open_storage(args.root, common.options_of(args))
    if not storage.exists(""):
        raise CheckpointNotFoundError(f"{args.root}: no such folder")
    removed, kept = collect_garbage(storage, args.older_than, args.dry_run)
    return {"root": args.root, "dry_run": args.dry_run, "older_than_seconds": args.older_than,
            "removed": removed, "kept": kept,
            "freed_bytes": sum(r["bytes"] for r in removed)}


def run(args, out: Output) -> int:
    """Collect garbage; exit 0."""
    doc = collect(args)
    if out.as_json:
        out.json(doc)
        return 0
    verb = "would remove" if doc["dry_run"] else "removed"
    rows = [[verb, r["name"], r["kind"], human_bytes(r["bytes"]), _age(r["age_seconds"]),
             r["reason"]] for r in doc["removed"]]
    rows += [["kept", r["name"], r["kind"], human_bytes(r["bytes"]), _age(r["age_seconds"]),
              r["reason"]] for r in doc["kept"]]
    if rows:
        out.table(["action", "name", "kind", "size", "age", "why"], rows)
    out.line(f"{verb} {len(doc['removed'])} leftover(s), {human_bytes(doc['freed_bytes'])}; "
             f"kept {len(doc['kept'])}")
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
