"""GPU staging benchmark: device-to-host throughput and the async_save stall on a CUDA device.

Usage:
    python scripts/bench/gpu.py [--size-gib 2] [--reps 3] [--guarded]

Measures, in one run on one GPU: a bare ``copy_`` of the state into pinned host memory (the
limit), shardckpt's staging of the same state (``async_save`` until it returns: the training's
stall), and the time to the commit. Prints medians and ratios; targets (issue: async save): the
stall within 1.2x the bare pinned copy.

``--guarded`` measures the overlap instead: a GPU MLP with AdamW (params + moments about
``--size-gib``) trains with and without a guarded ``async_save`` after every step. Reported:
the call's stall, how long ``step()`` waited for the copy (``wait_seconds``), the step time
added, and the overlap = 1 - added / bare copy time (1.0: the copy hid entirely behind the
forward/backward).
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

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
import harness as bh  # noqa: E402 - this folder is first on the path
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


def guarded_overlap(size_gib: float, reps: int) -> None:
    """Step time with a guarded save after every step against none, on the device."""
    width = 4096
    layers = max(1, int(size_gib * (1 << 30)) // (3 * 4 * width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, device="cuda")
                                  for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(4096, width, device="cuda")
    tensors = [t for t in model.parameters()]
    workdir = tempfile.mkdtemp(prefix="bench_gpu-guarded-")

    def steps(save: bool, n: int = 4) -> dict:
        stalls, waits, handle = [], [], None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            model(x).square().mean().backward()
            opt.step()  # waits for the previous save's copy (its pre-hook)
            opt.zero_grad(set_to_none=False)
            if handle is not None:
                waits.append(handle.wait_seconds)
                handle.result()
                shutil.rmtree(handle.path, ignore_errors=True)
            if save:
                t1 = time.perf_counter()
                handle = shardckpt.async_save({"model": model, "optim": opt},
                                              os.path.join(workdir, f"s{i}"))
                stalls.append(time.perf_counter() - t1)
        if handle is not None:
            handle.result()
            shutil.rmtree(handle.path, ignore_errors=True)
        torch.cuda.synchronize()
        return {"step": (time.perf_counter() - t0) / n, "stall": stalls, "wait": waits}
    try:
        steps(True, 2)
        base = statistics.median(steps(False)["step"] for _ in range(reps))
        runs = [steps(True) for _ in range(reps)]
        pinned = [torch.empty(t.shape, pin_memory=True) for t in tensors for _ in range(3)]
        srcs = [t for t in tensors for _ in range(3)]  # params + 2 moments' worth of bytes
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for d, src in zip(pinned, srcs):
            d.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        copy = time.perf_counter() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    step = statistics.median(r["step"] for r in runs)
    stall = statistics.median(s for r in runs for s in r["stall"])
    wait = statistics.median(w for r in runs for w in r["wait"])
    added = step - base
    print(f"bench_gpu --guarded: {torch.cuda.get_device_name()}, {layers} x {width}^2 fp32 + "
          f"AdamW, median of {reps} x 4 steps")
    print(f"  step without saves {base:.3f} s, with a guarded save every step {step:.3f} s")
    print(f"  call stall {stall * 1e3:.2f} ms, step() waited {wait * 1e3:.2f} ms, "
          f"bare pinned copy of the state {copy * 1e3:.1f} ms")
    print(f"  overlap {1 - added / copy:.2f} (1 - added step time / bare copy)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--guarded", action="store_true", help="the guarded save's overlap")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to measure")
        return 0
    if args.guarded:
        guarded_overlap(args.size_gib, args.reps)
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
    bh.print_checks([bh.check("stall <= 1.2x bare pinned copy", bh.ratio(s, c), 1.2)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
