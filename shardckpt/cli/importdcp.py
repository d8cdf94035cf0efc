"""``shardckpt import-dcp DCP_DIR OUT --trust-pickle``: a checkpoint written by stock
``torch.distributed.checkpoint`` (FileSystemWriter), rewritten as a shardckpt checkpoint.

DCP's ``.metadata`` file and its non-tensor values are pickles: reading them runs whatever code
they name. That is why this is the one place shardckpt unpickles anything, and only behind an
explicit ``--trust-pickle``. Tensors are read by DCP's own reader (whole, in this process);
non-tensor values are kept where they are plain values shardckpt can store without pickling,
and dropped with a warning otherwise.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from ..api import save
from ..errors import CheckpointError, CheckpointNotFoundError
from . import common
from .common import UsageError
from .output import Output, human_bytes

HELP = "convert a torch.distributed.checkpoint folder into a shardckpt checkpoint"
PLAIN = (bool, int, float, str, type(None), torch.dtype)


def register(sub, parent) -> None:
    """Add the ``import-dcp`` subcommand."""
    p = sub.add_parser("import-dcp", parents=[parent], help=HELP, description=HELP + ".")
    p.add_argument("dcp_dir", help="the DCP checkpoint folder (with its .metadata file)")
    p.add_argument("out", help="the shardckpt checkpoint to write")
    p.add_argument("--trust-pickle", action="store_true",
                   help="required: DCP's metadata and values are pickles, which can run code")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--codec", choices=("auto", "zstd", "raw"), default=None)
    p.set_defaults(func=run)


def _reader(path: str, options: dict | None):
    """DCP's reader for a local folder, or its fsspec reader for a URL."""
    if "://" in path and not path.startswith("file://"):
        from torch.distributed.checkpoint import FsspecReader
        return FsspecReader(path, **(options or {}))
    from torch.distributed.checkpoint import FileSystemReader
    local = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.isfile(os.path.join(local, ".metadata")):
        raise CheckpointNotFoundError(f"{path}: no DCP checkpoint here (no .metadata file)")
    return FileSystemReader(local)


def read_dcp(path: str, options: dict | None = None) -> dict:
    """The whole DCP checkpoint at ``path`` as nested dicts, tensors on the CPU. Unpickles."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    reader = _reader(path, options)
    try:
        with warnings.catch_warnings():  # "assuming a single process": exactly the intent
            warnings.simplefilter("ignore")
            return _load_state_dict_from_keys(storage_reader=reader)
    except CheckpointException as exc:  # a BaseException in DCP: catch it by name
        # Its text embeds tracebacks; name just each rank's underlying error.
        causes = "; ".join(f"{type(f[0]).__name__}: {f[0]}" for f in exc.failures.values())
        raise CheckpointError(f"{path}: DCP could not read it: {causes or exc}") from None


def keep_plain(state, path: str = "") -> tuple[object, list[str]]:
    """``(state without values that would need pickling, their paths)``."""
    dropped: list[str] = []

    def walk(v, where):
        if isinstance(v, (torch.Tensor,) + PLAIN):
            return v
        if isinstance(v, dict) and all(isinstance(k, (str, int)) and not isinstance(k, bool)
                                       for k in v):
            kept = {}
            for k, child in v.items():
                value = walk(child, f"{where}/{k}" if where else str(k))
                if value is not _DROP:
                    kept[k] = value
            return kept
        if isinstance(v, (list, tuple)):
            items = [walk(c, f"{where}/{i}" if where else str(i)) for i, c in enumerate(v)]
            if any(i is _DROP for i in items):
                dropped.append(f"{where} ({type(v).__name__} holding unsupported values)")
                return _DROP
            return type(v)(items) if isinstance(v, list) else tuple(items)
        dropped.append(f"{where} ({type(v).__name__})")
        return _DROP
    result = walk(state, path)
    return ({} if result is _DROP else result), dropped


_DROP = object()


def _count(state) -> tuple[int, int, int]:
    """(tensors, plain values, tensor bytes) of a nested state."""
    if isinstance(state, torch.Tensor):
        return 1, 0, state.numel() * state.element_size()
    children = state.values() if isinstance(state, dict) else \
        state if isinstance(state, (list, tuple)) else None
    if children is None:
        return 0, 1, 0
    totals = [_count(c) for c in children]
    return tuple(sum(t[i] for t in totals) for i in range(3))


def run(args, out: Output) -> int:
    """Import; exit 0 once OUT is committed, 2 without --trust-pickle."""
    if not args.trust_pickle:
        raise UsageError("import-dcp unpickles DCP's .metadata and values, which can run "
                         "arbitrary code; pass --trust-pickle if you trust "
                         f"{args.dcp_dir}")
    print(f"shardckpt: warning: unpickling {args.dcp_dir} (--trust-pickle): only do this for "
          "checkpoints from a source you trust", file=sys.stderr)
    options = common.options_of(args)
    with out.progress("reading the DCP checkpoint"):
        state = read_dcp(args.dcp_dir, options)
    state, dropped = keep_plain(state)
    for where in dropped:
        print(f"shardckpt: warning: dropped {where}: not a plain value", file=sys.stderr)
    with out.progress("writing"):
        info = save(state, args.out, overwrite=args.overwrite, codec=args.codec,
                    storage_options=options)
    tensors, values, raw = _count(state)
    doc = {"dcp_dir": args.dcp_dir, "out": args.out, "tensors": tensors, "values": values,
           "raw_bytes": raw, "stored_bytes": info.stored_bytes, "dropped": dropped}
    if out.as_json:
        out.json(doc)
    else:
        out.line(f"imported {args.dcp_dir} -> {args.out}: {tensors} tensors "
                 f"({human_bytes(raw)} raw, {human_bytes(info.stored_bytes)} stored), "
                 f"{values} values, {len(dropped)} dropped")
    return 0
