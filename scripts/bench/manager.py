"""What checkpointing costs a training loop: CheckpointManager.maybe_save with async saves.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/bench/manager.py [--nproc 2] [--steps 60]
        [--save-every 10] [--reps 2]

Runs launch/train.py (the 3.3 M-parameter GPT, FSDP2 over gloo) under torchrun, alternating
runs without checkpoints (``--save-every 0``) and with an async save every N steps, and prints:
- the stall: time the loop spent inside ``maybe_save`` (the agreement every step, plus the copy
  and plan of each save), as a fraction of the loop's time, measured by train.py itself;
- the wall-clock overhead: loop time with checkpoints vs without, which also counts the
  background encode/write competing with training for the cores (on 2 cores running 2 ranks
  that is the larger part).
Target (issue 5): overhead <= 1 % of step time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import harness as bh


def one_run(nproc: int, steps: int, save_every: int) -> tuple[float, float, int]:
    """(stall seconds, loop seconds, checkpoints committed) of one training run."""
    with tempfile.TemporaryDirectory(dir=bh.REPO, prefix=".bench-manager-") as ckpt:
        stall, loop = bh.run_train(
            ["--checkpoint-dir", ckpt, "--max-steps", str(steps), "--save-every", str(save_every),
             "--keep-last", "2", "--keep-best", "0"],
            nproc=nproc, env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        return stall, loop, steps // save_every if save_every else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    base, ckpt, stalls = [], [], []
    for rep in range(args.reps):
        _, loop0, _ = one_run(args.nproc, args.steps, 0)
        stall, loop1, saves = one_run(args.nproc, args.steps, args.save_every)
        base.append(loop0)
        ckpt.append(loop1)
        stalls.append(stall)
        print(f"rep {rep}: no checkpoints {loop0:.2f} s; {saves} async saves {loop1:.2f} s "
              f"(stall in maybe_save {stall:.3f} s)", flush=True)
    b, c, s = statistics.median(base), statistics.median(ckpt), statistics.median(stalls)
    step = b / args.steps
    print(f"\n{args.nproc} ranks, {args.steps} steps, async save every {args.save_every} steps;"
          f" step time {step * 1e3:.0f} ms without checkpoints (median of {args.reps})")
    print(f"stall in maybe_save:  {s:.3f} s = {100 * s / c:.2f} % of loop time   (target <= 1 %)")
    print(f"wall-clock overhead:  {c - b:+.3f} s = {100 * (c - b) / b:+.2f} % "
          "(includes background encode/write sharing the cores)")


if __name__ == "__main__":
    main()
