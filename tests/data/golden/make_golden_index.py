"""Writes the golden checkpoint of revision 1.4 (FORMAT.md 3.7): chunk index files and grid
rules, saved by 2 gloo ranks, and defines what it holds.

Usage: python tests/data/golden/make_golden_index.py   (only when revision 1.4 changes: the
checkpoint then stays as it is, and every later reader must load it).
"""

import os
import sys

import torch

NAME = "v1.4-index"


def full_state() -> dict:
    """The state as one process sees it, consolidated; deterministic values (no RNG)."""
    ramp = torch.arange(1200, dtype=torch.float64)
    return {
        "model": {
            "w": (torch.sin(ramp) * 0.02).to(torch.bfloat16).reshape(40, 30),  # Shard(0)
            "v": torch.cos(ramp[:77]).to(torch.float32).reshape(7, 11),        # Shard(1), uneven
            "r": torch.arange(12, dtype=torch.int64).reshape(3, 4),            # Replicate
            "odd": torch.linspace(-1, 1, 10, dtype=torch.float16),  # no rule: explicit boxes
            "bias": torch.linspace(-1, 1, 32, dtype=torch.float32),            # plain replica
        },
        "step": 1400,
        "position": 100,  # rank r saved 100 + r (rank_overrides)
    }


def rank_state(rank: int, world: int) -> dict:
    """What rank ``rank`` of 2 saves: DTensors on a 1-D mesh of both ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (world, 1))  # two mesh dims splitting dim 0: no grid rule
    full = full_state()
    m = full["model"]
    return {"model": {"w": distribute_tensor(m["w"], mesh, [Shard(0)]),
                      "v": distribute_tensor(m["v"], mesh, [Shard(1)]),
                      "r": distribute_tensor(m["r"], mesh, [Replicate()]),
                      "odd": distribute_tensor(m["odd"], mesh2, [Shard(0), Shard(0)]),
                      "bias": m["bias"].clone()},
            "step": full["step"], "position": full["position"] + rank}


def _save(rank, world, dest):
    import shardckpt
    shardckpt.save(rank_state(rank, world), dest, codec="zstd", chunk_bytes=64, overwrite=True,
                   metadata={"note": "golden checkpoint of revision 1.4, 2 ranks"}, timeout=60)


def main() -> int:
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
    from shardckpt.testing import run_with_ranks
    dest = os.path.join(os.path.dirname(os.path.abspath(__file__)), NAME)
    run_with_ranks(2, _save, dest)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
