"""``shardckpt convert CKPT --to safetensors|torch OUT``: one consolidated file of plain tensors
for deployment (through ``shardckpt.export``), whatever world size saved the checkpoint."""

from __future__ import annotations

import os

from ..export import FORMATS, export_weights
from . import common
from .common import UsageError
from .output import Output, human_bytes

HELP = "export a checkpoint as one safetensors or torch.save file"


def register(sub, parent) -> None:
    """Add the ``convert`` subcommand."""
    p = sub.add_parser("convert", parents=[parent], help=HELP, description=HELP + ".")
    p.add_argument("path", help="the checkpoint folder or URL")
    p.add_argument("out", help="the file to write (a local path)")
    p.add_argument("--to", choices=FORMATS, required=True, help="output format")
    p.add_argument("--weights-only", action="store_true",
                   help="only the 'model' subtree (or --key's)")
    p.add_argument("--key", help="the subtree to export, '/'-separated (implies "
                   "--weights-only; default with --weights-only: model)")
    p.add_argument("--prefix", default="", help="prepended to every tensor name ('model.')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run)


def run(args, out: Output) -> int:
    """Export; exit 0 once OUT is written (atomically)."""
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists (pass --overwrite to replace it)")
    key = args.key or ("model" if args.weights_only else None)
    if args.to == "safetensors":
        try:
            import safetensors  # noqa: F401  (checked first: failing after the read wastes it)
        except ImportError:
            raise UsageError("--to safetensors needs the safetensors package "
                             "(pip install safetensors)") from None
    with out.progress(f"exporting to {args.to}"):
        info = export_weights(args.path, args.out, format=args.to, key=key, prefix=args.prefix,
                              storage_options=common.options_of(args))
    doc = {"path": args.path, "out": args.out, "format": args.to, "key": key,
           "prefix": args.prefix, **info}
    if out.as_json:
        out.json(doc)
    else:
        out.line(f"wrote {args.out}: {info['tensors']} tensors, {human_bytes(info['bytes'])} "
                 f"({args.to}{', subtree ' + key if key else ''})")
    return 0
