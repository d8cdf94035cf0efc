"""How much resident memory one ``async_save`` adds, measured as a new user would.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/measure_rss.py [--state-mib 768] [--budget-mib 64]
        [--dir DIR] [--guard] [--codec auto]

A fresh process imports shardckpt, builds the state (fp32 tensors of 4 MiB; with ``--guard``, a
model's parameters plus AdamW moments guarded by the optimizer), reads its RSS, runs one
``async_save(..., staging_budget_bytes=budget).result()`` and reads the peak RSS
(VmHWM, the kernel's high-water mark, reset after the state is built, so short peaks count).
Nothing is warmed up first unless ``--warm``: the growth includes the first save's one-time
costs (threads, the native pool, the arena). The
last line is JSON: the growth, the budget and their ratio (the issue's target: <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile

import torch

import shardckpt

MIB = 1 << 20


def rss_now() -> int:
    """The current resident set size in bytes (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak() -> int:
    """The RSS high-water mark since the last ``reset_peak`` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Start the high-water mark again from the current RSS (building the state peaked)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(state_mib: int, guard: bool):
    """``(state, optimizer or None)`` of about ``state_mib`` MiB."""
    if not guard:
        return {f"w{i}": torch.randn(MIB) for i in range(state_mib // 4)}, None
    params = [torch.nn.Parameter(torch.randn(MIB)) for _ in range(state_mib // 12)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # the moments exist (2 x the parameters)
    for p in params:
        p.grad = None
    return {"params": {str(i): p for i, p in enumerate(params)}, "optim": opt}, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state-mib", type=int, default=768)
    ap.add_argument("--budget-mib", type=int, default=64)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--guard", action="store_true")
    ap.add_argument("--codec", default="auto")
    ap.add_argument("--warm", action="store_true", help="save a tiny state first (one-time "
                    "costs off the count)")
    args = ap.parse_args()
    state, _ = build(args.state_mib, args.guard)
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        if args.warm:
            shardckpt.async_save({"x": torch.ones(1)}, f"{root}/warm").result()
        reset_peak()
        base = rss_now()
        handle = shardckpt.async_save(state, f"{root}/c", codec=args.codec,
                                      staging_budget_bytes=args.budget_mib * MIB)
        handle.result()
        grown = peak() - base
    finally:
        shutil.rmtree(root, ignore_errors=True)
    budget = args.budget_mib * MIB
    print(json.dumps({"state_mib": args.state_mib, "budget_mib": args.budget_mib,
                      "guard": args.guard, "codec": args.codec, "warm": args.warm, "grown_mib": grown / MIB,
                      "ratio": grown / budget, "stall_s": handle.stall_seconds}))


if __name__ == "__main__":
    main()
