"""torchtitan's DCP checkpointer against shardckpt's, on the same 2-rank CPU training loop.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/bench/titan_ckpt.py [--width 1024] [--layers 4]
        [--steps 12] [--interval 4] [--reps 1]

Each contender runs the loop torchtitan's Trainer runs (FSDP2 over gloo ranks, torchtitan's
ModelWrapper, OptimizersContainer (AdamW), LRSchedulersContainer and ParallelAwareDataloader),
with the checkpointer built from its Config and called where the Trainer calls it. Printed per
contender: the time the loop spent in ``save`` and ``maybe_wait_for_staging`` per step and per
checkpoint, the loop's wall-clock time against a run without checkpoints, the bytes of the last
checkpoint on disk, and the time ``load`` takes to resume from it on the same ranks. The
contenders take turns in round-robin order; the machine's other load lands on all of them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn as nn

import harness as bh


def contenders():
    """(name, Config) for each checkpointer compared."""
    from torchtitan.components.checkpointer import CheckpointManager as DCPManager

    from shardckpt.integrations.torchtitan import ShardCkptCheckpointManager as Ours
    common = dict(enable=True, folder="ckpt", keep_latest_k=0, last_save_model_only=False)
    return [
        ("dcp sync", lambda iv: DCPManager.Config(interval=iv, async_mode="disabled", **common)),
        ("dcp async", lambda iv: DCPManager.Config(interval=iv, async_mode="async", **common)),
        ("shardckpt sync", lambda iv: Ours.Config(interval=iv, async_mode="disabled",
                                                  handle_preemption=False, **common)),
        ("shardckpt async", lambda iv: Ours.Config(interval=iv, async_mode="async",
                                                   handle_preemption=False, **common)),
    ]


class Rows(torch.utils.data.IterableDataset):
    def __init__(self, rank: int, width: int):
        self.rank, self.width = rank, width

    def __iter__(self):
        g = torch.Generator().manual_seed(self.rank)
        while True:
            yield torch.randn(self.width, generator=g)


def run(rank, world, config, dump, width, layers, steps):
    """Train ``steps`` steps; (seconds in the checkpointer, loop seconds, load seconds)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizers = default_adamw(lr=1e-3, implementation="foreach").build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers,
                                                                    training_steps=steps)
    loader = ParallelAwareDataloader(Rows(rank, width), dp_rank=rank, dp_world_size=world,
                                     batch_size=8)

    class Trainer:
        step = 0

        def state_dict(self):
            return {"step": self.step}

        def load_state_dict(self, sd):
            self.step = sd["step"]

    trainer = Trainer()
    build = dict(dataloader=loader, model_parts=[model], optimizers=optimizers,
                 lr_schedulers=schedulers, states={"train_state": trainer}, sd_adapter=None,
                 base_folder=dump)
    ckpt = config.build(**build) if config is not None else None
    batches, in_ckpt = iter(loader), 0.0
    torch.distributed.barrier()
    begin = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.step = step
        model(next(batches)).pow(2).mean().backward()
        t = time.perf_counter()
        if ckpt:
            ckpt.maybe_wait_for_staging()
        in_ckpt += time.perf_counter() - t
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        t = time.perf_counter()
        if ckpt:
            ckpt.save(step, last_step=step == steps)
        in_ckpt += time.perf_counter() - t
    loop = time.perf_counter() - begin
    if ckpt is None:
        return 0.0, loop, 0.0
    ckpt.close()
    torch.distributed.barrier()
    again = config.build(**build)  # the same ranks resume from the newest checkpoint
    t = time.perf_counter()
    again.load()
    torch.distributed.barrier()
    load = time.perf_counter() - t
    again.close()
    return in_ckpt, loop, load


def main() -> None:
    from shardckpt.testing import run_with_ranks
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args()
    params = args.layers * (args.width * args.width + args.width)
    print(bh.header("torchtitan checkpointers: DCP vs shardckpt",
                    f"2 gloo ranks (FSDP2), {params / 1e6:.1f} M fp32 params + AdamW "
                    f"({3 * 4 * params / bh.MIB:.0f} MiB of state), {args.steps} steps, "
                    f"a checkpoint every {args.interval} steps and at the last"))
    saves = args.steps // args.interval + (args.steps % args.interval != 0)
    results: dict[str, list] = {}
    names = [("none", None)] + contenders()
    for rep in range(args.reps):
        for name, make in bh.rotated(names, rep):
            with tempfile.TemporaryDirectory(dir=bh.REPO, prefix=".bench-titan-") as dump:
                config = make(args.interval) if make else None
                out = run_with_ranks(2, run, config, dump, args.width, args.layers, args.steps,
                                     timeout=900)
                size = bh.disk_bytes(os.path.join(dump, "ckpt", f"step-{args.steps}")) \
                    if make else 0
            in_ckpt = max(r.value[0] for r in out)
            loop = max(r.value[1] for r in out)
            load = max(r.value[2] for r in out)
            results.setdefault(name, []).append((in_ckpt, loop, load, size))
            bh.log(f"{name}: in checkpointer {in_ckpt:.2f} s, loop {loop:.2f} s")
    base = bh.median([r[1] for r in results["none"]])
    rows = []
    for name, _ in contenders():
        rs = results[name]
        in_ckpt, loop, load = (bh.median([r[i] for r in rs]) for i in range(3))
        rows.append([name, f"{1e3 * in_ckpt / args.steps:.0f}", f"{in_ckpt / saves:.2f}",
                     f"{loop - base:+.2f}", f"{rs[-1][3] / bh.MIB:.1f}", f"{load:.2f}"])
    print(bh.table(["checkpointer", "ms/step in ckpt", "s per save", "loop +s vs none",
                    "MiB on disk", "resume s"], rows))
    print(f"loop without checkpoints: {base:.2f} s ({1e3 * base / args.steps:.0f} ms/step); "
          f"median of {args.reps}")


if __name__ == "__main__":
    main()
