"""Preemptible GPT-style language-model training that checkpoints with shardckpt.

Usage:
    python launch/train.py --checkpoint-dir DIR [--max-steps 200] [--save-every 50]
        [--freeze] [--incremental] [--codec auto|zstd|raw] [--data-workers 2]
    torchrun --nproc-per-node 2 launch/train.py --checkpoint-dir DIR [--parallel fsdp|ddp]
    (or launch/torchrun.sh, launch/slurm.sbatch)

A small decoder-only transformer (about 3.3 M parameters by default) learns to predict the next
byte of real text: the Python standard library's own source files, which every machine with
Python has. Under torchrun it shards the model with FSDP2 (``fully_shard``, default) or
replicates it with DDP; gloo on CPUs, NCCL when every rank has a GPU.

Checkpointing goes through ``shardckpt.CheckpointManager``: an async save every
``--save-every`` steps (guarded by the optimizer: its parameters and moments are copied while
the next forward/backward runs, and ``optim.step()`` waits for that copy), retention (``--keep-last``, ``--keep-best`` by loss), and preemption: on
SIGTERM every rank saves at the end of the current step, commits and exits with status 75. On
start it resumes from the newest checkpoint that loads: model, optimizer, LR schedule, RNG and
data position, on any world size (the global batch is fixed, so the math does not depend on the
number of ranks). The data position is ``shardckpt.data.DistributedSampler``'s: the job's place
in the epoch's permutation, counted in samples the loop consumed (``--data-workers`` prefetch
ahead of it), so every window is trained on once per epoch across preemptions and world sizes.
RNG states are restored per rank on the same world size, else reseeded from (seed, step, rank).

Rank 0 prints ``step=<n> loss=<float>`` once per step (other lines start with ``[train]``). On
the CPU the run is deterministic: a run preempted and resumed on the same world size prints the
same lines as an uninterrupted one.

Exit status: 0 finished; 75 preempted after committing a checkpoint (restart it); 76 preempted
but the checkpoint missed the grace period (restart it: the previous checkpoint is intact);
anything else is an error.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import shardckpt
import shardckpt.data


# ------------------------------------------------------------------------------------ model
class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# ------------------------------------------------------------------------------------ data
def stdlib_corpus(limit: int) -> torch.Tensor:
    """The bytes of the standard library's top-level ``.py`` files, in name order."""
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        parts.append(data[: limit - total])
        total += len(parts[-1])
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq + 1`` bytes of the corpus. Item ``i`` is ``(i, window)``:
    the loop knows which samples it trains on (``--record-indices``)."""

    def __init__(self, corpus: torch.Tensor, seq: int):
        self.rows = corpus[: len(corpus) // (seq + 1) * (seq + 1)].view(-1, seq + 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return i, self.rows[i]


def batches(sampler, loader):
    """``(epoch, indices, tokens, targets)`` per step, epoch after epoch, from the sampler's
    position. ``track`` counts the batches this loop took (the loader's workers fetch ahead),
    so a checkpoint holds the samples the training consumed."""
    while True:
        for indices, rows in sampler.track(loader):
            yield sampler.epoch, indices, rows[:, :-1], rows[:, 1:]
        sampler.set_epoch(sampler.epoch + 1)


def data_loader(windows: Windows, args, rank: int, world: int):
    """The job's sampler and loader. The sampler's state is the job's global position in the
    epoch's permutation: any world size resumes it, with the same global batches. ``drop_last``
    on both makes every epoch ``len // global batch`` full global batches on any world size."""
    sampler = shardckpt.data.DistributedSampler(windows, num_replicas=world, rank=rank,
                                                seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        windows, batch_size=args.global_batch_size // world, sampler=sampler, drop_last=True,
        num_workers=args.data_workers, generator=torch.Generator().manual_seed(args.seed))
    return sampler, loader


def recorder(args, rank: int, world: int, device):
    """Where this rank notes the indices of every step (``--record-indices``), or None."""
    if not args.record_indices:
        return None
    from shardckpt.testing.records import Recorder
    run = torch.tensor([time.time_ns()], dtype=torch.int64, device=device)
    if world > 1:
        dist.broadcast(run, 0)  # one id for every rank of this incarnation of the job
    return Recorder(args.record_indices, int(run.item()), rank, world)


# ------------------------------------------------------------------------------------ state
class ModelAndOptimizer:
    """Model and optimizer through torch's distributed state-dict helpers: keys are parameter
    names (FQNs) whatever the wrapping (FSDP2, DDP, none), so any world size can resume."""

    def __init__(self, model, optim):
        self.model, self.optim = model, optim

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(self.model, self.optim)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, sd):
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(self.model, self.optim, model_state_dict=sd["model"],
                       optim_state_dict=sd["optim"])


# ------------------------------------------------------------------------------------ setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--save-every", type=int, default=50, help="steps between saves (0: never)")
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--keep-best", type=int, default=1, help="also keep the N lowest-loss ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp")
    p.add_argument("--sync-save", action="store_true", help="save in the foreground")
    p.add_argument("--corpus-bytes", type=int, default=4 << 20)
    p.add_argument("--data-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--record-indices", default=None, metavar="DIR",
                   help="append the sample indices of every step to DIR/<run>-rank<r>.txt "
                        "(tests check that each sample is trained on once per epoch)")
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep per step (lets a demo interrupt a fast run)")
    p.add_argument("--hold-file", default=None,
                   help="while this file exists, wait before each step (until preempted): "
                        "lets a demo or test line up host failures and joins with the steps")
    p.add_argument("--freeze", action="store_true", help="fine-tuning: freeze the embeddings "
                   "and the first half of the blocks")
    p.add_argument("--incremental", action="store_true",
                   help="incremental checkpoints: unchanged chunks are referenced, not rewritten")
    p.add_argument("--codec", choices=("auto", "zstd", "raw"), default=None,
                   help="checkpoint codec (default: the knob, auto)")
    p.add_argument("--local-dir", default=None,
                   help="local tier folder on each node ($VARS expanded, {node}: the node "
                        "index); with --local-every")
    p.add_argument("--local-every", type=int, default=0,
                   help="steps between local-tier saves, replicated on another node (0: none)")
    return p.parse_args(argv)


def init_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > int(os.environ["LOCAL_RANK"])
    # A lost peer (a host gone, its link cut) fails the collective waiting on it after this
    # many seconds, so the agent can restart the group (the default is 30 minutes).
    timeout = datetime.timedelta(seconds=float(os.environ.get("SHARDCKPT_PG_TIMEOUT", 1800)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def wrap(model: nn.Module, parallel: str, world: int, device) -> nn.Module:
    if world == 1 and not dist.is_initialized():
        return model
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def lr_lambda(warmup: int, total: int):
    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return scale


def global_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    if args.global_batch_size % world:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"the world size {world}")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # the same kernels every run: resumed runs are bit-exact
    model = GPT(256, args.seq_len, args.dim, args.layers, args.heads).to(device)
    params = sum(p.numel() for p in model.parameters())
    if args.freeze:
        frozen = [model.embed, *model.blocks[:args.layers // 2]]
        for p in [model.pos, *(p for m in frozen for p in m.parameters())]:
            p.requires_grad_(False)
    model = wrap(model, args.parallel, world, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(args.warmup, args.max_steps))
    windows = Windows(stdlib_corpus(args.corpus_bytes), args.seq_len)
    sampler, loader = data_loader(windows, args, rank, world)
    state = {"train": ModelAndOptimizer(model, optim), "sched": sched, "data": sampler,
             "step": 0}
    # Per-rank streams: restored exactly on the same world size, else reseeded from
    # (seed, step, rank); loading them on another world size needs per_rank="rank0" below.
    state["rng"] = shardckpt.data.RankRNG(args.seed, step=lambda: state["step"])
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    say(f"[train] {params / 1e6:.2f} M parameters, world size {world} ({args.parallel}), "
        f"{len(windows)} windows of {args.seq_len} bytes")

    mgr = shardckpt.CheckpointManager(
        args.checkpoint_dir, every_n_steps=args.save_every or None,
        keep_last=args.keep_last or None, keep_best=args.keep_best or None, monitor="loss",
        async_save=not args.sync_save, load_options={"per_rank": "rank0"},
        guard=optim,  # parameters and moments are copied during the next forward/backward
        incremental=args.incremental,
        save_options={"codec": args.codec} if args.codec else None,
        local_dir=os.path.expandvars(args.local_dir) if args.local_dir else None,
        local_every_n_steps=args.local_every or None, replicas=1)
    resumed = mgr.restore(state)
    step = state["step"] if resumed is not None else 0
    say(f"[train] resumed from {mgr.path(resumed)} at world size {world}" if resumed is not None
        else "[train] starting from scratch")

    stream, record = batches(sampler, loader), recorder(args, rank, world, device)
    stall = loop = 0.0
    with mgr:
        while step < args.max_steps:
            t0 = time.perf_counter()
            epoch, indices, tokens, targets = next(stream)
            if record:
                record.record(step + 1, epoch, indices.tolist())
            logits = model(tokens.to(device))
            loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())
            optim.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            step += 1
            state["step"] = step
            mean_loss = global_mean(loss, world)
            say(f"step={step} loss={mean_loss!r}")
            t1 = time.perf_counter()
            saved = mgr.maybe_save(step, state, {"loss": mean_loss})
            t2 = time.perf_counter()
            stall += t2 - t1
            loop += t2 - t0
            if saved and mgr.preempted:
                say(f"[train] preempted: checkpoint {mgr.path(step)} committed; exiting "
                    f"with status {shardckpt.EXIT_PREEMPTED}")
                return shardckpt.EXIT_PREEMPTED
            time.sleep(args.step_sleep)
            while args.hold_file and os.path.exists(args.hold_file) \
                    and not mgr.preemption_requested:
                time.sleep(0.1)
        if args.save_every and step % args.save_every and step != resumed:
            mgr.save(step, state, {"loss": mean_loss})  # the final state, always
    say(f"[train] done: {step} steps; checkpoint stall {stall:.3f} s of {loop:.3f} s "
        f"({100 * stall / max(loop, 1e-9):.2f} %)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
