"""What checkpointing adds to a real training loop: guarded vs eager shardckpt vs DCP.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/bench/train_overhead.py [--width 2048] [--layers 16]
        [--batch 64] [--reps 2] [--dir DIR] [--json OUT] [--quick]

The loop: an MLP of ``--layers`` fp32 ``width x width`` layers (16 x 2048: 268 MiB of
parameters), AdamW, a fixed input batch, forward + backward + step. Contenders, alternated in
blocks within each repetition (the starting one rotates):
  - ``none``: no checkpoint;
  - ``guarded``: ``shardckpt.async_save({"model": model, "optim": opt})`` right after the step
    (the optimizer in the state is a guard: its tensors are copied during the next
    forward/backward and the next ``step()`` waits for the copy);
  - ``eager``: the same with the state dicts (no guard: the copy blocks the call);
  - ``dcp``: ``dcp.async_save`` with a kept ``DefaultStager`` (async CPU staging), waiting
    ``staging_completion`` just before the next ``optimizer.step()`` (torchtitan's pattern).
Each contender saves every step (blocks of ``STEPS_EVERY_1`` steps) and every 10 steps (blocks
of 10 steps, one save). A block ends by waiting for its last save to commit, on the clock; each
save goes to a fresh folder and the one before the previous is deleted after the commit.

Reported per mode: mean step time, the time added per step against ``none``, and CPU seconds
per step of the main thread and of all other threads (torch's intra-op workers, shardckpt's or
DCP's copy and write threads, the native encoders), so that a copy competing with compute on a
small host shows up as other-thread CPU time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as bh  # noqa: E402 - needs the path above
from harness import check, med, ratio, rotated  # noqa: E402

warnings.filterwarnings("ignore")

import shardckpt  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint.staging import DefaultStager  # noqa: E402

CONTENDERS = ("none", "guarded", "eager", "dcp")
STEPS_EVERY_1 = 4
CPU_STAGING = bh.dcp_cpu_staging()


TICK = os.sysconf("SC_CLK_TCK")


def _task_cpu() -> dict[int, tuple[str, float]]:
    """tid -> (OS thread name, CPU seconds) for the threads alive now (Linux /proc)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{tid}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (stat[stat.index("(") + 1:stat.rindex(")")],
                         (int(fields[11]) + int(fields[12])) / TICK)  # utime + stime
    return out


def thread_cpu() -> dict:
    """CPU seconds of this process so far: the main thread, everything, and each thread alive."""
    return {"main": time.thread_time(), "all": time.process_time(), "tasks": _task_cpu()}


def cpu_split(before: dict, after: dict, steps: int) -> dict:
    """CPU seconds per step: the main thread; torch's intra-op workers (long-lived threads other
    than main and shardckpt's ``sc-*``, alive across the block); and the rest, which is the
    checkpointing (shardckpt's copier and writer threads, the native encoders and writers they
    start, DCP's threads; the short-lived ones are known only through the process total)."""
    main = after["main"] - before["main"]
    me = threading.get_native_id()
    workers = sum(cpu - before["tasks"][tid][1] for tid, (name, cpu) in after["tasks"].items()
                  if tid in before["tasks"] and tid != me and not name.startswith("sc-"))
    rest = after["all"] - before["all"] - main - workers
    return {"main_cpu": main / steps, "torch_cpu": workers / steps, "ckpt_cpu": rest / steps,
            "other_cpu": (workers + rest) / steps}


class Saver:
    """One contender's saves: start after a step, wait before the next step, flush."""

    def __init__(self, name: str, model, opt, root: str):
        self.name, self.model, self.opt, self.root = name, model, opt, root
        self.pending, self.paths, self.n = None, [], 0
        self.stager = DefaultStager(CPU_STAGING) if name == "dcp" else None

    def save(self) -> None:
        self.flush()
        self.n += 1
        path = os.path.join(self.root, f"{self.name}-{self.n}")
        if self.name == "guarded":
            self.pending = shardckpt.async_save({"model": self.model, "optim": self.opt}, path)
        elif self.name == "eager":
            self.pending = shardckpt.async_save({"model": self.model.state_dict(),
                                                 "optim": self.opt.state_dict()}, path)
        else:
            self.pending = dcp.async_save({"model": self.model.state_dict(),
                                           "optim": self.opt.state_dict()},
                                          storage_writer=FileSystemWriter(path),
                                          async_stager=self.stager, no_dist=True)
        self.paths.append(path)

    def before_step(self) -> None:
        if self.name == "dcp" and self.pending is not None:
            self.pending.staging_completion.result()

    def flush(self) -> None:
        if self.pending is not None:
            if self.name == "dcp":
                self.pending.upload_completion.result()
            else:
                self.pending.result()
            self.pending = None
        while len(self.paths) > 1:  # keep the newest committed one, as keep_last=1 would
            shutil.rmtree(self.paths.pop(0), ignore_errors=True)

    def close(self) -> None:
        self.flush()
        for p in self.paths:
            shutil.rmtree(p, ignore_errors=True)
        if self.stager is not None:
            self.stager.close()


def block(model, opt, x, saver: Saver | None, steps: int, every: int) -> dict:
    """``steps`` training steps, saving every ``every``; the final commit is on the clock."""
    cpu0, t0 = thread_cpu(), time.perf_counter()
    for i in range(steps):
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if saver is not None:
            saver.before_step()
        opt.step()
        if saver is not None and i % every == 0:
            saver.save()
    if saver is not None:
        saver.flush()
    wall, cpu1 = time.perf_counter() - t0, thread_cpu()
    return {"step": wall / steps, **cpu_split(cpu0, cpu1, steps)}


def run(args, root: str) -> dict:
    torch.manual_seed(0)
    layers = [m for _ in range(args.layers)
              for m in (torch.nn.Linear(args.width, args.width), torch.nn.ReLU())]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(args.batch, args.width)
    savers = {n: Saver(n, model, opt, root) if n != "none" else None for n in CONTENDERS}
    bh.log(f"model: {sum(p.numel() for p in model.parameters()) * 4 / bh.GIB:.3f} GiB params")
    for n in CONTENDERS:  # first saves and first steps off the record
        bh.log(f"warm-up {n}: {block(model, opt, x, savers[n], 2, 1)['step']:.3f} s/step")
    records = {mode: {n: [] for n in CONTENDERS} for mode in (1, 10)}
    for rep in range(args.reps):
        for mode, steps in ((1, STEPS_EVERY_1), (10, 10)):
            for n in rotated(list(CONTENDERS), rep):
                rec = block(model, opt, x, savers[n], steps, mode)
                records[mode][n].append(rec)
                bh.log(f"rep {rep + 1}/{args.reps} every {mode}: {n}: {rec['step']:.3f} s/step "
                       f"(cpu: main {rec['main_cpu']:.2f}, torch workers "
                       f"{rec['torch_cpu']:.2f}, checkpointing {rec['ckpt_cpu']:.2f})")
    for s in savers.values():
        if s is not None:
            s.close()
    return {"records": records, "args": vars(args)}


def report(result: dict) -> list[dict]:
    results = []
    for mode, recs in result["records"].items():
        base = med(recs["none"], "step")
        added = {n: med(r, "step") - base for n, r in recs.items()}
        print(f"\n=== saving every {mode} step(s): median over {len(recs['none'])} blocks")
        rows = [[n, f"{med(r, 'step'):.3f}", f"{added[n]:+.3f}",
                 bh.fmt(ratio(added[n], base) * 100, "+.1f"),
                 *(f"{med(r, k):.2f}" for k in ("main_cpu", "torch_cpu", "ckpt_cpu"))]
                for n, r in recs.items()]
        print(bh.table(["contender", "s/step", "added s/step", "added %", "main cpu s/step",
                        "torch workers cpu", "checkpointing cpu"], rows))
        if mode == 1:
            results.append(check("every step: guarded added time <= 0.5x DCP's",
                                 ratio(added["guarded"], added["dcp"]), 0.5))
            results.append(check("every step: eager added / DCP added",
                                 ratio(added["eager"], added["dcp"]), None))
        else:
            results.append(check("every 10 steps: guarded added time <= 3% of the step",
                                 ratio(added["guarded"], base), 0.03))
            results.append(check("every 10 steps: DCP added / step",
                                 ratio(added["dcp"], base), None))
    bh.print_checks(results)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dir", help="where to write (a fresh folder inside it; default /tmp)")
    p.add_argument("--json", help="write every measurement to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: a small model, 1 rep")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.batch, args.reps = 512, 4, 32, 1
    root = tempfile.mkdtemp(prefix="bench_train-", dir=args.dir)
    load = os.getloadavg()[0]
    try:
        result = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(bh.header("bench/train_overhead", f"{torch.get_num_threads()} torch threads",
                    f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after"))
    result["checks"] = report(result)
    bh.write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
