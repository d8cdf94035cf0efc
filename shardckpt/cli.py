"""The ``shardckpt`` command line (a first slice: ``verify`` and ``inspect``).

Exit status: 0 on success, 1 when a checkpoint fails its checks, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import codecs, read, storage
from .api import verify
from .errors import CheckpointError


def _verify(args) -> int:
    report = verify(args.path, storage_options=args.storage_options)
    print(f"OK {report.path}: {report.tensors} tensors, {report.chunks} chunks, "
          f"{report.raw_bytes / 2**20:.1f} MiB raw, {report.stored_bytes / 2**20:.1f} MiB stored "
          f"(codec backend: {codecs.BACKEND})")
    return 0


def _inspect(args) -> int:
    st, name = storage.open_checkpoint(args.path, args.storage_options)
    m = read.open_manifest(st, name)
    if args.json:
        print(json.dumps({"world_size": m.world_size, "metadata": m.metadata, "tensors": {
            k: {"dtype": t.dtype.name, "shape": list(t.shape), "shards": len(t.boxes)}
            for k, t in m.tensors.items()}}, indent=1))
        return 0
    print(f"{args.path}: format v1, world size {m.world_size}, {len(m.tensors)} tensors, "
          f"metadata {json.dumps(m.metadata)}")
    for key, t in m.tensors.items():
        stored = int(t.chunks[:, 2].sum())
        print(f"  {key:60s} {t.dtype.name:9s} {str(list(t.shape)):20s} {stored:>12d} B")
    return 0


def _path_args(p) -> None:
    p.add_argument("path", help="a checkpoint folder or fsspec URL (s3://bucket/run/step-10)")
    p.add_argument("--storage-options", type=json.loads, default=None, metavar="JSON",
                   help='fsspec options for a URL, e.g. \'{"anon": true}\'')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="shardckpt", description="Inspect shardckpt "
                                     "checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every checksum of a checkpoint")
    _path_args(p)
    p.set_defaults(func=_verify)
    p = sub.add_parser("inspect", help="list a checkpoint's tensors and metadata")
    _path_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CheckpointError as exc:
        print(f"shardckpt: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `shardckpt inspect PATH | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
