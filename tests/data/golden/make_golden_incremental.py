"""Writes the golden incremental pair of FORMAT.md revision 1.3 (section 3.6): a base checkpoint
with content hashes and one incremental on it, side by side under one root.

Usage: python tests/data/golden/make_golden_incremental.py   (once: later readers must load the
pair as it is committed).
"""

import os
import sys

import torch

try:
    from .make_golden import golden_state
except ImportError:  # run as a script
    from make_golden import golden_state

ROOT = "v1.3-incremental"
BASE, INCREMENTAL = "step-00001200", "step-00001201"


def golden_pair() -> tuple[dict, dict]:
    """The base state and the incremental one: only ``fc.bias`` and ``step`` changed."""
    base = golden_state()
    base["model"]["tied"] = base["model"]["fc.weight"]
    newer = golden_state()
    newer["model"]["tied"] = newer["model"]["fc.weight"]
    newer["model"]["fc.bias"] = torch.linspace(1, -1, 32, dtype=torch.float16)
    newer["step"] = 1201
    return base, newer


def main() -> int:
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
    import shardckpt
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), ROOT)
    os.makedirs(root, exist_ok=True)
    base, newer = golden_pair()
    meta = {"note": "golden incremental pair of format v1, revision 1.3"}
    shardckpt.save(base, os.path.join(root, BASE), codec="zstd", chunk_bytes=1024,
                   overwrite=True, metadata=meta, content_hashes=True)
    shardckpt.save(newer, os.path.join(root, INCREMENTAL), codec="zstd", chunk_bytes=1024,
                   overwrite=True, metadata=meta, base=BASE)
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
