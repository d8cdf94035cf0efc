"""``shardckpt ls ROOT``: the checkpoints under a manager root, with sizes (for incremental ones
the stored bytes written against those referenced in earlier checkpoints), metrics, latest and
best, and the leftovers of interrupted saves. "Best" follows the manager's own ``monitor`` and
``mode``, which it records in the root (manage/rootinfo.py); options override them."""

from __future__ import annotations

from ..errors import CheckpointError, CheckpointNotFoundError
from ..save import written_split
from ..format.opening import open_manifest
from ..manage.retention import best_steps
from ..storage import open_storage
from ..manage import layout
from ..manage.layout import LATEST_NAME, STEP_NAME
from ..types import MANIFEST_NAME
from ..manage.pruning import history_rows, kind_of
from ..manage.rootinfo import read_info
from . import common
from .output import Output, human_bytes, human_number

HELP = "list the checkpoints under a manager root"


def register(sub, parent) -> None:
    """Add the ``ls`` subcommand."""
    p = sub.add_parser("ls", parents=[parent], help=HELP, description=HELP + ".")
    p.add_argument("root", help="the manager's root folder or URL")
    p.add_argument("--monitor", help="metric that ranks checkpoints for 'best' (default: the "
                   "manager's, else the only metric every checkpoint records)")
    p.add_argument("--mode", choices=("min", "max"), default=None,
                   help="which end of --monitor is best (default: the manager's; min for a "
                   "root that does not record it)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the history (step against "
                   "size and the metric, kept and best marked) to this PNG (needs matplotlib)")
    p.set_defaults(func=run)


def _row(storage, entry: layout.RootEntry) -> dict:
    row = {"name": entry.name, "step": entry.step, "state": entry.kind, "latest": False,
           "best": False, "bytes": None, "raw_bytes": None, "stored_bytes": None,
           "ratio": None, "metrics": None, "reason": None, "unix_time": None, "error": None,
           "written_bytes": None, "referenced_bytes": None, "epoch": None, "kind": None}
    if entry.kind == "unreadable":  # may be committed; this process cannot look inside
        row["error"] = f"cannot be read: {entry.error}"
        return row
    if not entry.committed:
        row["bytes"] = layout.folder_bytes(storage, entry.name)
        return row
    try:
        m = open_manifest(storage, entry.name)
    except CheckpointError as exc:  # listed, not fatal: ls is how one finds such a checkpoint
        row.update(state="unreadable", error=f"{type(exc).__name__}: {exc}",
                   bytes=layout.folder_bytes(storage, entry.name))
        return row
    raw, stored = common.total_bytes(m)
    info = common.manager_info(m)
    split = written_split(m)
    row.update(bytes=common.disk_bytes(m, common.manifest_size(storage, entry.name)),
               raw_bytes=raw, stored_bytes=stored, ratio=common.ratio(raw, stored),
               metrics=info.get("metrics"), reason=info.get("reason"),
               unix_time=info.get("unix_time", m.created_unix or None),
               epoch=info.get("epoch"), kind=kind_of(info, split["referenced_bytes"]), **split)
    return row


def _latest(storage, committed: list[int]) -> int | None:
    """The step the ``latest`` file names when it is committed, else the newest committed."""
    try:
        match = STEP_NAME.fullmatch(storage.read(LATEST_NAME).decode().strip())
    except (OSError, UnicodeDecodeError):
        match = None
    if match and int(match.group(1)) in committed:
        return int(match.group(1))
    return max(committed) if committed else None


def _monitor(rows: list[dict], asked: str | None) -> str | None:
    """``asked``, or the one metric name every committed checkpoint with metrics shares."""
    if asked:
        return asked
    names = {frozenset(r["metrics"]) for r in rows if r["metrics"]}
    if len(names) == 1 and len(next(iter(names))) == 1:
        return next(iter(next(iter(names))))
    return None


def collect(args) -> dict:
    """The ``--json`` document of ``ls``."""
    folder, named_manifest = common.manifest_folder(args.root)
    storage = open_storage(folder, common.options_of(args))
    if not storage.exists(""):
        raise CheckpointNotFoundError(f"{args.root}: no such folder")
    if named_manifest or storage.exists(MANIFEST_NAME):
        raise common.UsageError(
            f"{folder} is one checkpoint (it holds {MANIFEST_NAME}), not a manager root: see "
            f"what it holds with `shardckpt inspect {folder}`")
    rows = [_row(storage, e) for e in layout.entries(storage)]
    committed = {r["step"]: r for r in rows if r["state"] == "committed"}
    latest = _latest(storage, sorted(committed))
    stored = read_info(storage) or {}
    monitor = _monitor(list(committed.values()), args.monitor or stored.get("monitor"))
    mode, source = _mode(args.mode, stored, monitor)
    ranked = best_steps(committed, {s: r["metrics"] for s, r in committed.items()}, monitor,
                        mode, 1) if monitor else []
    best = ranked[0] if ranked else None
    for step, row in committed.items():
        row["latest"], row["best"] = step == latest, step == best
    return {"root": args.root, "latest": latest, "best": best, "monitor": monitor,
            "mode": mode, "mode_source": source, "checkpoints": rows,
            "history": history_rows(storage, sorted(committed)),
            "other_checkpoints": [] if rows else _other_checkpoints(storage)}


def _other_checkpoints(storage) -> list[str]:
    """Checkpoint folders not named by a manager (Lightning's ``epoch=0-step=9.ckpt``...):
    looked for only when the root has no manager entries, so that ls on such a folder does not
    print an empty table without a word."""
    return [n for n in sorted(storage.list("")) if storage.exists(f"{n}/{MANIFEST_NAME}")]


def _mode(asked: str | None, stored: dict, monitor: str | None) -> tuple[str, str]:
    """``(mode, where it came from)``: the option, else the manager's for its own monitor,
    else ``min`` (what ls assumed before managers recorded their mode)."""
    if asked:
        return asked, "option"
    if stored and stored.get("monitor") == monitor:
        return stored["mode"], "manager"
    return "min", "assumed"


def run(args, out: Output) -> int:
    """List the root; exit 0 (an unreadable checkpoint is shown, not fatal). A path to one
    checkpoint is a usage error (exit 2) whose message suggests ``inspect``; a folder of
    checkpoints not written by a manager lists them under ``other_checkpoints`` (exit 0)."""
    doc = collect(args)
    if args.plot:
        from .plot import draw
        draw(doc, args.plot)
    if out.as_json:
        out.json(doc)
        return 0
    rows = []
    for r in doc["checkpoints"]:
        flags = ", ".join(f for f in ("latest", "best") if r[f])
        metrics = " ".join(f"{k}={human_number(v)}" for k, v in (r["metrics"] or {}).items())
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        written, referenced = r["written_bytes"], r["referenced_bytes"]
        rows.append([r["step"] if r["step"] is not None else "-", r["state"],
                     human_number(r["epoch"]), r["kind"] or "-", human_bytes(r["bytes"]), ratio,
                     human_bytes(written) if written is not None else "-",
                     human_bytes(referenced) if referenced is not None else "-",
                     metrics or "-", r["reason"] or "-", flags, r["name"]])
    out.table(["step", "state", "epoch", "kind", "size", "ratio", "written", "referenced",
               "metrics", "reason", "", "name"], rows, title=f"{doc['root']}")
    others = doc["other_checkpoints"]
    if others:
        out.line(f"no manager checkpoints (step-N folders) here, but {len(others)} other "
                 f"checkpoint folder(s): {', '.join(others)}; see one with "
                 f"`shardckpt inspect {doc['root'].rstrip('/')}/{others[-1]}`")
    if doc["monitor"]:
        assumed = " (mode assumed: the root records no manager's mode)" \
            if doc["mode_source"] == "assumed" else ""
        out.line(f"best by {doc['monitor']} ({doc['mode']}): {doc['best']}{assumed}")
    if args.plot:
        out.line(f"plotted to {args.plot}")
    return 0
