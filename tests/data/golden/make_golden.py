"""Writes the golden checkpoint of the current format version, and defines what it holds.

Usage: python tests/data/golden/make_golden.py [REVISION]   (only when FORMAT.md's version or
document revision changes: the checkpoints of earlier ones stay as they are, and every later
reader must load them). With REVISION (e.g. ``1.2``) it writes ``v<REVISION>/``: the state of
that revision, which adds what the revision introduced to ``golden_state()``.
"""

import io
import math
import os
import sys

import torch


def golden_state() -> dict:
    """Deterministic values (no RNG), so any torch version rebuilds them bit-exactly."""
    ramp = torch.arange(4096, dtype=torch.float64)
    return {
        "model": {
            "embed.weight": (torch.sin(ramp) * 0.02).to(torch.bfloat16).reshape(64, 64),
            "fc.weight": (torch.cos(ramp[:1024]) * 0.1).to(torch.float32).reshape(32, 32),
            "fc.bias": torch.linspace(-1, 1, 32, dtype=torch.float16),
            "steps": torch.arange(-50, 50, 7, dtype=torch.int64),
            "mask": torch.arange(30) % 3 == 0,
            "bytes": (torch.arange(257) * 97 % 256).to(torch.uint8),
            "z": torch.complex(ramp[:8], -ramp[8:16]).to(torch.complex64),
            "scalar": torch.tensor(3.25, dtype=torch.float64),
            "empty": torch.empty(0, 5, dtype=torch.int32),
        },
        "optim": {"state": {0: {"step": torch.tensor(10.0)}},
                  "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8,
                                    "foreach": None, "amsgrad": False, "params": [0]}]},
        "step": 1200,
        "huge": 2**70,
        "special": [math.inf, -0.0, "text/with~chars"],
        "dtype": torch.bfloat16,
    }


def golden_state_1_2() -> dict:
    """Revision 1.2: bytes and io.BytesIO values (node kinds ``bytes``, ``bytesio``) and
    ``torch.Size`` (node kind ``size``)."""
    state = golden_state()
    state["values_1_2"] = {
        "raw": bytes(range(256)) * 3,
        "empty": b"",
        "buffer": io.BytesIO(b"\x80\x04 not a pickle, just bytes \x00\xff"),
        "in_list": [b"a", b"bc"],
        "size": torch.Size([3, 0, 7]),
    }
    return state


REVISIONS = {"1.2": golden_state_1_2}


def main() -> int:
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
    import shardckpt
    from shardckpt.types import FORMAT_VERSION
    revision = sys.argv[1] if len(sys.argv) > 1 else None
    name = f"v{revision}" if revision else f"v{FORMAT_VERSION}"
    dest = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    state = REVISIONS[revision]() if revision else golden_state()
    state["model"]["tied"] = state["model"]["fc.weight"]
    shardckpt.save(state, dest, codec="zstd", chunk_bytes=1024, overwrite=True,
                   metadata={"note": f"golden checkpoint of format {name}"})
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
