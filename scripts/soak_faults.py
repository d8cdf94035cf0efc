#!/usr/bin/env python
"""Usage: .venv/bin/python scripts/soak_faults.py [--kill-trials 200] [--rank-kill-trials 20]
                                                  [--corruption-trials 500] [--fuzz-inputs 100000]
                                                  [--seed 0]

Runs each fault many times and prints a table: fault, trials, outcomes, lost. Exits 1 if
anything was lost (a committed checkpoint damaged, a wrong value loaded, a corruption missed)
or an unexpected exception escaped (anything but a CheckpointError, or the fuzzed backends
disagreeing), 0 otherwise. The same trial code runs, sampled, in tests/faults/.

Faults: kill -9 of a process saving in a loop, and of one rank of two (gloo); random single-byte
corruption and truncation of a committed checkpoint; fuzzed chunks (native and reference
decoders) and fuzzed manifests (re-signed table, value and byte mutations).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

BAD = ("lost", "escaped")


def kill_single(n: int, seed: int, work: str) -> Counter:
    from shardckpt.testing import crash
    rng, total = random.Random(seed), Counter()
    for i in range(n):
        total += crash.kill_single(os.path.join(work, f"kill-{i}"), seed + i, rng,
                                   inside=i % 2 == 1)
        shutil.rmtree(os.path.join(work, f"kill-{i}"), ignore_errors=True)
    return total


def kill_rank(n: int, seed: int, work: str) -> Counter:
    from shardckpt.testing import crash
    rng, total = random.Random(seed), Counter()
    for i in range(n):
        out, report = crash.kill_rank(os.path.join(work, f"rank-{i}"), seed + i, rng,
                                      timeout=4.0)
        total += out
        limit = 4.0 + 10 if report["victim"] else 2 * 4.0 + 30
        if (report.get("seconds") or 1e9) > limit:
            total["escaped"] += 1  # the survivor did not raise within the timeout
        shutil.rmtree(os.path.join(work, f"rank-{i}"), ignore_errors=True)
    return total


def corruption(n: int, seed: int, work: str) -> Counter:
    """Flip one random byte (or cut the tail) of a random file of a committed checkpoint:
    every reader must refuse it with a CheckpointError, never load it."""
    import shardckpt
    from shardckpt.errors import CheckpointError
    from shardckpt.testing import crash, flip_byte, truncate
    rng, total = random.Random(seed), Counter()
    path = os.path.join(work, "corrupt")
    shardckpt.save(crash.expected_state(1, seed), path, codec="zstd", chunk_bytes=512)
    files = [os.path.join(d, f)[len(path) + 1:] for d, _, fs in os.walk(path) for f in fs]
    for _ in range(n):
        rel = rng.choice(files)
        full = os.path.join(path, rel)
        backup = open(full, "rb").read()
        if rng.random() < 0.8:
            flip_byte(full, rng.randrange(len(backup)), 1 << rng.randrange(8))
        else:
            truncate(full, rng.randrange(1, len(backup)))
        for read in (lambda: shardckpt.load_full(path), lambda: shardckpt.verify(path)):
            try:
                read()
                total["lost"] += 1  # damaged, yet accepted
            except CheckpointError:
                total["detected"] += 1
            except Exception:  # noqa: BLE001 - counted, not hidden
                total["escaped"] += 1
        with open(full, "wb") as f:
            f.write(backup)
    return total


def fuzz_chunks(n: int, seed: int, work: str) -> Counter:
    from shardckpt.testing import fuzz
    rng, total = random.Random(seed), Counter()
    for _ in range(n):
        try:
            total[fuzz.check_chunk(*fuzz.random_chunk(rng), work)] += 1
        except AssertionError as exc:
            total["escaped"] += 1
            print(f"  chunk fuzz: {exc}", file=sys.stderr)
    return total


def fuzz_manifests(n: int, seed: int, work: str) -> Counter:
    import shardckpt
    from shardckpt.testing import crash, fuzz
    rng, total = random.Random(seed), Counter()
    path = os.path.join(work, "fuzz-manifest")
    shardckpt.save(crash.expected_state(2, seed), path, codec="zstd", chunk_bytes=512)
    valid = open(os.path.join(path, "manifest.json"), "rb").read()
    for _ in range(n):
        try:
            total[fuzz.check_manifest(fuzz.random_manifest(valid, rng), path)] += 1
        except AssertionError as exc:
            total["escaped"] += 1
            print(f"  manifest fuzz: {exc}", file=sys.stderr)
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--kill-trials", type=int, default=200)
    p.add_argument("--rank-kill-trials", type=int, default=20)
    p.add_argument("--corruption-trials", type=int, default=500)
    p.add_argument("--fuzz-inputs", type=int, default=100_000,
                   help="total fuzz inputs; 60%% chunks, 40%% manifests")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    chunk_inputs = args.fuzz_inputs * 6 // 10
    plan = [("kill -9, saving process", kill_single, args.kill_trials),
            ("kill -9, 1 of 2 ranks", kill_rank, args.rank_kill_trials),
            ("byte flip / truncation", corruption, args.corruption_trials),
            ("fuzz: chunk decoder", fuzz_chunks, chunk_inputs),
            ("fuzz: manifest", fuzz_manifests, args.fuzz_inputs - chunk_inputs)]
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="shardckpt-soak-") as work:
        for name, run, n in plan:
            if n <= 0:
                continue
            t0 = time.monotonic()
            out = run(n, args.seed, work)
            seconds = time.monotonic() - t0
            failed |= any(out[k] for k in BAD)
            rows.append((name, n, out, seconds))
            print(f"{name}: {n} trials, {dict(out)} ({seconds:.0f} s)", file=sys.stderr)
    print(f"| fault | trials | outcomes | lost | escaped | seconds |")
    print(f"|---|---:|---|---:|---:|---:|")
    for name, n, out, seconds in rows:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(out.items()) if k not in BAD)
        print(f"| {name} | {n} | {outcomes} | {out['lost']} | {out['escaped']} | "
              f"{seconds:.0f} |")
    print("FAIL: something was lost or escaped" if failed else "OK: nothing lost, nothing escaped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
