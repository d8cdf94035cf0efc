"""The ``shardckpt`` command line: ls, inspect, verify, diff, convert, copy, import-dcp, gc.

One module per subcommand, each with ``register(subparsers, parent)`` and ``run(args, out)``;
``output`` renders (JSON, rich tables, plain text, progress), ``common`` holds the global options
and manifest facts; ``shardckpt.manage.layout`` knows the names under a manager root.

Exit status: 0 success; 1 a checkpoint fails its checks or any error while doing the work (one
line on stderr: ``shardckpt: <ErrorType>: <message>``); 2 a usage error, including a path of
the wrong kind (``ls`` on one checkpoint, ``inspect`` on a manager root: the message names the
command that fits). ``diff`` follows diff(1): 0 equal, 1 different, 2 any error. Set
``SHARDCKPT_DEBUG=1`` for the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import convert, copy, diff, gc, importdcp, inspect, ls, verify
from .common import UsageError, common_options
from .output import Output

__all__ = ["main", "build_parser", "UsageError"]

SUBCOMMANDS = (ls, inspect, verify, diff, convert, copy, importdcp, gc)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="shardckpt", description="Inspect, check, compare, convert and clean up shardckpt "
        "checkpoints. Paths may be local folders or fsspec URLs (with --storage-option).")
    from .._version import __version__
    parser.add_argument("--version", action="version", version=f"shardckpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = common_options()
    for module in SUBCOMMANDS:
        module.register(sub, parent)
    return parser


def _fail(out: Output | None, exc: BaseException, status: int) -> int:
    """Report ``exc`` in one line on stderr (and as JSON on stdout with --json)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"shardckpt: {type(exc).__name__}: {message}", file=sys.stderr)
    if out is not None and out.as_json:
        out.json({"error": {"type": type(exc).__name__, "message": message}})
    return status


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage (or --help / --version)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    out = Output(as_json=args.json)
    try:
        return args.func(args, out)
    except UsageError as exc:
        return _fail(out, exc, EXIT_USAGE)
    except BrokenPipeError:  # `shardckpt ls ROOT | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # CheckpointError and anything else: one line, not a traceback
        if os.environ.get("SHARDCKPT_DEBUG"):
            raise
        # diff uses 1 for "they differ", so its errors say 2
        return _fail(out, exc, getattr(args, "error_status", EXIT_FAILED))
