"""``shardckpt copy SRC DST``: copy one checkpoint, bringing along the chunks it references in
earlier checkpoints of its root (incremental saves), so that the copy stands alone."""

from __future__ import annotations

from ..ops.copy import copy_checkpoint
from . import common
from .output import Output, human_bytes

HELP = "copy a checkpoint anywhere, materialising what it references"


def register(sub, parent) -> None:
    """Add the ``copy`` subcommand."""
    p = sub.add_parser("copy", parents=[parent], help=HELP, description=HELP + ".")
    p.add_argument("src", help="the checkpoint folder or URL")
    p.add_argument("dst", help="the new checkpoint folder or URL (its parent must exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(func=run)


def run(args, out: Output) -> int:
    """Copy; exit 0 once DST is committed."""
    options = common.options_of(args)
    with out.progress("copying"):
        info = copy_checkpoint(args.src, args.dst, overwrite=args.overwrite,
                               storage_options=options, dst_storage_options=options)
    if out.as_json:
        out.json({"src": args.src, "dst": args.dst, **info})
    else:
        out.line(f"copied {args.src} to {args.dst}: {info['files']} files, "
                 f"{human_bytes(info['bytes'])} ({info['materialised']} referenced file(s) "
                 "materialised)")
    return 0
