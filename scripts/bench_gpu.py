"""GPU staging benchmark: device-to-host throughput and the async_save stall on a CUDA device.

Usage:
    python scripts/bench_gpu.py [--size-gib 2] [--reps 3]

Measures, in one run on one GPU: a bare ``copy_`` of the state into pinned host memory (the
limit), shardckpt's staging of the same state (``async_save`` until it returns: the training's
stall), and the time to the commit. Prints medians and ratios; targets (issue: async save): the
stall within 1.2x the bare pinned copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
import shardckpt  # noqa: E402


def gpu_state(size_gib: float) -> dict:
    """bf16 and fp32 tensors of transformer-like shapes on the device."""
    n = int(size_gib * (1 << 30)) // (4096 * 4096 * 3)  # per layer: one bf16 + one fp32 matrix
    gen = torch.Generator(device="cuda").manual_seed(0)
    state = {}
    for i in range(max(n, 1)):
        state[f"l{i}.w"] = torch.randn(4096, 4096, device="cuda", generator=gen).bfloat16()
        state[f"l{i}.m"] = torch.randn(4096, 4096, device="cuda", generator=gen)
    return state


def bare_copy(state: dict, pinned: dict) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k, v in state.items():
        pinned[k].copy_(v, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def async_stall(state: dict, path: str) -> tuple[float, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    handle = shardckpt.async_save(state, path)
    stall = time.perf_counter() - t0
    handle.result()
    return stall, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to measure")
        return 0
    state = gpu_state(args.size_gib)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in state.items()}
    workdir = tempfile.mkdtemp(prefix="bench_gpu-")
    copies, stalls, commits = [], [], []
    try:
        for rep in range(args.reps + 1):  # rep 0 warms up (arena allocation, CUDA context)
            c = bare_copy(state, pinned)
            s, total = async_stall(state, os.path.join(workdir, f"r{rep}"))
            shutil.rmtree(os.path.join(workdir, f"r{rep}"), ignore_errors=True)
            if rep:
                copies.append(c)
                stalls.append(s)
                commits.append(total)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    gb = nbytes / 1e9
    c, s, t = (statistics.median(x) for x in (copies, stalls, commits))
    print(f"bench_gpu: {torch.cuda.get_device_name()}, state {gb:.2f} GB, median of {args.reps}")
    print(f"  bare pinned copy_ (limit)   {c:7.3f} s  {gb / c:6.2f} GB/s")
    print(f"  async_save stall            {s:7.3f} s  {gb / s:6.2f} GB/s  {s / c:5.2f}x the limit")
    print(f"  async_save to commit        {t:7.3f} s")
    print(f"  {'PASS' if s <= 1.2 * c else 'FAIL'}  stall <= 1.2x bare pinned copy: {s / c:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
