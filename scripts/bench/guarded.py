"""The stall of a guarded ``async_save`` against eager, DCP and a warm copy (``async_save.py
--guarded``).

State: a model's fp32 parameters (layers of ``WIDTH`` x ``WIDTH``) plus their AdamW moments,
about ``--size-gib`` in all, with a small buffer that is not guarded. Contenders, round-robin
within each repetition (the starting one rotates), medians reported:
  - ``copy_`` of every state tensor into buffers allocated once (a warm copy: the issue's limit);
  - shardckpt ``async_save`` eager: the state dicts, no guard (today's behaviour);
  - shardckpt ``async_save`` guarded: the optimizer object in the state, so it is a guard. The
    stall is the call; ``wait_staged`` right after is timed too (what a ``step()`` issued with
    no forward/backward in between would wait: the worst case);
  - DCP ``async_save`` with its fastest CPU stager (``DefaultStager``, async staging, no pinned
    or shared memory, kept across saves), stalled until ``staging_completion``.
Every contender saves once before the repetitions (first-call costs are not in the medians).
"""

from __future__ import annotations

import os
import time

import torch

import harness as bh
from harness import check, med, ratio, remove

WIDTH = 2048
COPY, EAGER, GUARDED, DCP = ("copy_ into reused buffers", "shardckpt eager",
                             "shardckpt guarded", "DCP async_save (async stager)")


def build(size_gib: float):
    """``(model params, buffer, AdamW)`` whose params + moments are about ``size_gib``."""
    layers = max(1, round(size_gib * bh.GIB / (3 * 4 * WIDTH * WIDTH)))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(WIDTH, WIDTH, generator=gen) * 0.02)
              for _ in range(layers)]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn(WIDTH, WIDTH, generator=gen) * 1e-3
    opt.step()
    for p in params:
        p.grad = None
    return params, torch.zeros(WIDTH), opt


def _state(params, buffer, optim):
    return {"model": {f"layer{i}.weight": p for i, p in enumerate(params)}, "buffer": buffer,
            "optim": optim}


def run(args, workdir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.staging import DefaultStager

    import shardckpt
    params, buffer, opt = build(args.size_gib)
    guarded = _state(params, buffer, opt)
    eager = _state(params, buffer, opt.state_dict())
    tensors = bh.tensors_of(eager)
    buffers = [torch.empty_like(t) for t in tensors]
    stager = DefaultStager(bh.dcp_cpu_staging())

    def copy(path):
        t0 = time.perf_counter()
        for dst, src in zip(buffers, tensors):
            dst.copy_(src)
        return {"stall": time.perf_counter() - t0}

    def sc(state, path):
        t0 = time.perf_counter()
        h = shardckpt.async_save(state, path)
        stall = time.perf_counter() - t0
        h.wait_staged()
        staged = time.perf_counter() - t0
        h.result()
        return {"stall": stall, "staged": staged, "wait": h.wait_seconds,
                "commit": time.perf_counter() - t0}

    def dcp_save(path):
        t0 = time.perf_counter()
        r = dcp.async_save(_state(params, buffer, opt.state_dict()),
                           storage_writer=FileSystemWriter(path), async_stager=stager,
                           no_dist=True)
        r.staging_completion.result()
        stall = time.perf_counter() - t0
        r.upload_completion.result()
        return {"stall": stall, "commit": time.perf_counter() - t0}

    contenders = {COPY: copy, EAGER: lambda p: sc(eager, p), GUARDED: lambda p: sc(guarded, p),
                  DCP: dcp_save}

    def measure(name, rep):
        os.sync()  # the previous contender's writes must not be flushed on this one's clock
        path = os.path.join(workdir, "g")
        try:
            return contenders[name](path)
        finally:
            remove(path)
    for name in contenders:  # the first save of each, not counted
        measure(name, -1)
    records = bh.round_robin(list(contenders), args.reps, measure,
                             lambda rec: f"stall {rec['stall']:.4f} s")
    stager.close()
    return {"records": records, "state_bytes": bh.state_bytes(eager),
            "description": f"{len(params)} fp32 {WIDTH}x{WIDTH} params + AdamW moments "
                           f"(+ a {WIDTH}-float unguarded buffer)"}


def report(result: dict, reps: int) -> list[dict]:
    """Print the table and return the target checks."""
    records = result["records"]
    stall = {n: med(r, "stall") for n, r in records.items()}
    print(f"\n=== guarded stall: {result['description']}, "
          f"{result['state_bytes'] / bh.GIB:.3f} GiB")
    rows = [[n, f"{stall[n]:.4f}", bh.fmt(ratio(stall[n], stall[COPY]), ".3f"),
             bh.fmt(med(r, "staged"), ".3f"), bh.fmt(med(r, "commit"), ".2f")]
            for n, r in records.items()]
    print(bh.table(["contender", f"stall s (median of {reps})", "x warm copy",
                    "staged s (from call)", "commit s"], rows))
    checks = [check("guarded stall <= 0.05x warm copy", ratio(stall[GUARDED], stall[COPY]), 0.05),
              check("guarded stall / eager stall", ratio(stall[GUARDED], stall[EAGER]), None),
              check("guarded stall / DCP stall", ratio(stall[GUARDED], stall[DCP]), None)]
    return checks
