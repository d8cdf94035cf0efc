"""``shardckpt gc ROOT``: remove what interrupted saves left under a manager root.

Leftovers are the hidden ``.step-N.tmp-*`` / ``.old-*`` / ``.deleting-*`` folders and ``step-N``
folders without a manifest (an object-store save that died before its commit marker). A
committed checkpoint is never touched, and is checked again right before each removal. Leftovers
younger than ``--older-than`` may belong to a save still running and are kept; so is one whose
age the storage cannot tell. A ``.old-*`` folder is the only copy of a checkpoint when the crash
came between moving it aside and renaming its replacement in; it is kept while no committed
``step-N`` exists.
"""

from __future__ import annotations

import time

from ..commit import is_committed
from ..errors import CheckpointNotFoundError
from ..storage import open_storage
from . import common, layout
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


def _verdict(storage, entry: layout.RootEntry, committed: set, older_than: float,
             now: float) -> tuple[bool, str, float | None]:
    """``(remove?, why, age in seconds)`` for one leftover."""
    changed = layout.last_activity(storage, entry.name)
    age = None if changed is None else max(0.0, now - changed)
    if entry.kind == "old" and entry.step not in committed:
        return False, f"only copy of step {entry.step}: rename it to step-{entry.step:08d}", age
    if older_than > 0 and age is None:
        return False, "age unknown (the storage has no modification times)", age
    if age is not None and age < older_than:
        return False, f"younger than {older_than:g}s: a save may still be writing it", age
    return True, "leftover of an interrupted save", age


def collect(args) -> dict:
    """Decide, remove (unless --dry-run), and return the ``--json`` document of ``gc``."""
    storage = open_storage(args.root, common.options_of(args))
    if not storage.exists(""):
        raise CheckpointNotFoundError(f"{args.root}: no such folder")
    found = layout.entries(storage)
    committed = {e.step for e in found if e.committed}
    now, removed, kept = time.time(), [], []
    for entry in found:
        if entry.committed:
            continue
        remove, why, age = _verdict(storage, entry, committed, args.older_than, now)
        row = {"name": entry.name, "kind": entry.kind, "step": entry.step,
               "bytes": layout.folder_bytes(storage, entry.name), "age_seconds": age,
               "reason": why}
        # A step folder may have been committed since it was listed: check at the last moment.
        if remove and entry.kind == "uncommitted" and is_committed(storage, entry.name):
            remove, row["reason"] = False, "committed meanwhile"
        if remove and not args.dry_run:
            storage.delete(entry.name)
        (removed if remove else kept).append(row)
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
