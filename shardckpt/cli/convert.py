"""``shardckpt convert CKPT --to safetensors|torch|hf OUT``: consolidated plain tensors for
deployment (through ``shardckpt.ops.export``), whatever world size saved the checkpoint: one file, or
with ``--to hf`` a Hugging Face folder of safetensors shards plus their index."""

from __future__ import annotations

import os

from ..ops.export import DTYPE_NAMES, FORMATS, export_hf, export_weights
from ..errors import CheckpointError
from . import common
from .common import UsageError
from .output import Output, human_bytes

HELP = "export a checkpoint as a safetensors / torch.save file or a Hugging Face folder"


def register(sub, parent) -> None:
    """Add the ``convert`` subcommand."""
    p = sub.add_parser("convert", parents=[parent], help=HELP, description=HELP + ".")
    p.add_argument("path", help="the checkpoint folder or URL")
    p.add_argument("out", help="the file (or with --to hf the folder) to write, a local path")
    p.add_argument("--to", choices=FORMATS + ("hf",), required=True, help="output format")
    p.add_argument("--weights-only", action="store_true",
                   help="only the 'model' subtree (or --key's)")
    p.add_argument("--key", help="the subtree to export, '/'-separated (implies "
                   "--weights-only; default with --weights-only: model)")
    p.add_argument("--prefix", default="", help="prepended to every tensor name ('model.')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--max-shard-size", default="5GB",
                   help="--to hf: bytes per safetensors file (default 5GB)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                   help="--to hf: cast floating tensors (int and bool keep theirs)")
    p.add_argument("--config", help="--to hf: a config.json to place beside the weights")
    p.set_defaults(func=run)


def run(args, out: Output) -> int:
    """Export; exit 0 once OUT is written (atomically)."""
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists (pass --overwrite to replace it)")
    key = args.key or ("model" if args.weights_only or args.to == "hf" else None)
    if args.to != "hf" and (args.dtype or args.config):
        raise UsageError("--dtype and --config go with --to hf")
    with out.progress(f"exporting to {args.to}"):
        if args.to == "hf":
            try:
                info = export_hf(args.path, args.out, key=key, prefix=args.prefix,
                                 max_shard_size=args.max_shard_size, dtype=args.dtype,
                                 config=args.config, overwrite=args.overwrite,
                                 storage_options=common.options_of(args))
            except ValueError as exc:
                if isinstance(exc, CheckpointError):
                    raise
                raise UsageError(str(exc)) from None
        else:
            info = export_weights(args.path, args.out, format=args.to, key=key,
                                  prefix=args.prefix, storage_options=common.options_of(args))
    doc = {"path": args.path, "out": args.out, "format": args.to, "key": key,
           "prefix": args.prefix, **info}
    if out.as_json:
        out.json(doc)
    else:
        files = f" in {info['files']} files" if "files" in info else ""
        out.line(f"wrote {args.out}: {info['tensors']} tensors{files}, "
                 f"{human_bytes(info['bytes'])} ({args.to}{', subtree ' + key if key else ''})")
    return 0
