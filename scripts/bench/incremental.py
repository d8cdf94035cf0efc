"""Incremental checkpoints: bytes written per save when most of the state is frozen.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/bench/incremental.py [--steps 10] [--codec zstd]
        [--dim 256] [--layers 4] [--reps 4] [--json out.json]

Runs launch/train.py twice with the same seed, fine-tuning with the embeddings and the first
half of the blocks frozen (``--freeze``) and a synchronous save every step: once with full saves,
once with ``--incremental``. The CPU run is deterministic, so both runs hold the same values at
every step. For each step after the first it prints:
- full: the data bytes a full save wrote;
- changed: the stored bytes (in the full save) of the tensors whose values differ from the
  previous step: the state that actually changed;
- incremental: the data bytes the incremental save wrote itself (its own data files, headers
  included), and its ratio to ``changed`` (target <= 1.02);
and the total save time of each kind of run (train.py's stall with ``--sync-save``: the saves
themselves; median of ``--reps`` runs, alternated). Finally a no-op save (the last state saved
again on top of itself) must write no data file, only a manifest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

import harness as bh
import shardckpt
from harness import fmt, leaves, log, table, write_json
from shardckpt.format.opening import open_manifest
from shardckpt.storage import open_checkpoint


def train(ckpt: str, args, incremental: bool) -> float:
    """Run train.py; returns the seconds spent saving."""
    argv = ["--checkpoint-dir", ckpt, "--max-steps", str(args.steps), "--save-every", "1",
            "--keep-last", "0", "--keep-best", "0", "--sync-save", "--freeze",
            "--codec", args.codec, "--dim", str(args.dim), "--layers", str(args.layers)]
    return bh.run_train(argv + (["--incremental"] if incremental else []))[0]


def own_bytes(path: str) -> tuple[int, int]:
    """(data bytes in the checkpoint's own files, manifest bytes)."""
    m = open_manifest(*open_checkpoint(path))
    return (sum(f.size for f in m.files if f.base is None),
            os.path.getsize(os.path.join(path, "manifest.json")))


def changed_bytes(previous: str, current: str) -> int:
    """Stored bytes of ``current``'s tensors whose values differ from ``previous``."""
    m = open_manifest(*open_checkpoint(current))
    old, new = shardckpt.load_full(previous), shardckpt.load_full(current)
    flat_old, flat_new = dict(leaves(old)), dict(leaves(new))
    total = 0
    for key, entry in m.tensors.items():
        path = tuple(key.split("/"))
        a, b = flat_old.get(path), flat_new.get(path)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) \
                or not torch.equal(a, b):
            total += int(entry.chunks[:, 2].sum())
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--codec", default="zstd", choices=("zstd", "raw", "auto"))
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=4, help="runs of each kind, alternated")
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-incr-") as tmp:
        times = {False: [], True: []}
        for rep in range(args.reps):  # alternated: the shared disk's speed drifts
            for incremental in ((False, True) if rep % 2 == 0 else (True, False)):
                log(f"rep {rep}: {'incremental' if incremental else 'full'} saves ...")
                where = os.path.join(tmp, f"{'incremental' if incremental else 'full'}{rep}")
                os.sync()  # the previous run's writeback must not land on this run's fsyncs
                times[incremental].append(train(where, args, incremental))
        full_seconds, inc_seconds = statistics.median(times[False]), statistics.median(times[True])
        full_dir, inc_dir = os.path.join(tmp, "full0"), os.path.join(tmp, "incremental0")
        rows, records = [], []
        for step in range(2, args.steps + 1):
            name = f"step-{step:08d}"
            full, _ = own_bytes(os.path.join(full_dir, name))
            written, manifest = own_bytes(os.path.join(inc_dir, name))
            changed = changed_bytes(os.path.join(full_dir, f"step-{step - 1:08d}"),
                                    os.path.join(full_dir, name))
            records.append({"step": step, "full_bytes": full, "changed_bytes": changed,
                            "incremental_bytes": written, "manifest_bytes": manifest,
                            "ratio_to_changed": written / changed,
                            "fraction_of_full": written / full})
            rows.append([str(step), fmt(full / 1e6, ".2f"), fmt(changed / 1e6, ".2f"),
                         fmt(written / 1e6, ".2f"), fmt(written / changed, ".4f"),
                         fmt(written / full, ".3f"), str(manifest)])
        last = os.path.join(inc_dir, f"step-{args.steps:08d}")
        state = shardckpt.load_full(last)
        noop = os.path.join(inc_dir, "noop")
        shardckpt.save(state, noop, base=os.path.basename(last), codec=args.codec)
        noop_files = os.listdir(os.path.join(noop, "data"))
        assert shardckpt.verify(noop).ok
    print(table(["step", "full MB", "changed MB", "incr. MB", "incr./changed", "incr./full",
                 "manifest B"], rows))
    print(f"save time over {args.steps} saves, median of {args.reps} runs: full "
          f"{full_seconds:.3f} s {sorted(times[False])}, incremental {inc_seconds:.3f} s "
          f"{sorted(times[True])} ({inc_seconds / full_seconds:.2f}x)")
    print(f"no-op save: {len(noop_files)} data files, only the manifest written")
    worst = max(r["ratio_to_changed"] for r in records)
    print(f"worst incremental / changed: {worst:.4f} (target <= 1.02)")
    write_json({"args": vars(args), "steps": records, "full_seconds": times[False],
                "incremental_seconds": times[True], "noop_data_files": len(noop_files)},
               args.json)
    return 0 if worst <= 1.02 and not noop_files else 1


if __name__ == "__main__":
    sys.exit(main())
