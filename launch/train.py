"""A small preemptible training job that checkpoints with shardckpt.

Usage:
    python launch/train.py --checkpoint-dir DIR [--steps 300] [--save-every 40] [--keep 3]

Trains a tiny causal transformer language model on a synthetic, seeded token stream. Every
``--save-every`` steps it saves the whole training state (model, AdamW, RNG, data position, step)
to ``DIR/step-XXXXXXXX``; on SIGTERM it saves at the end of the current step and exits 0. On
start it resumes from the newest checkpoint that loads (skipping broken ones), so killing it at
any moment and starting it again continues the run exactly: the final weights are bit-identical
to an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import time

import torch
from torch import nn

import shardckpt

STEP_DIR = re.compile(r"step-(\d{8})")


class TinyLM(nn.Module):
    def __init__(self, vocab=512, dim=128, layers=2, heads=4, seq=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True)
        self.blocks = nn.TransformerEncoder(block, layers)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied weights: saved once, restored tied
        nn.init.normal_(self.embed.weight, std=0.02)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.blocks(x, mask=self.mask[: tokens.shape[1], : tokens.shape[1]],
                                     is_causal=True))


class TokenStream:
    """A seeded synthetic corpus read in a shuffled order; its position is part of the state."""

    def __init__(self, seed: int, vocab=512, seq=64, batch=16, samples=4096):
        g = torch.Generator().manual_seed(seed)
        # Sequences with structure (a noisy arithmetic progression) so the loss actually falls.
        start = torch.randint(0, vocab, (samples, 1), generator=g)
        stride = torch.randint(1, 8, (samples, 1), generator=g)
        self.data = (start + stride * torch.arange(seq + 1)) % vocab
        self.seed, self.batch, self.epoch, self.index = seed, batch, 0, 0

    def order(self):
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(
            self.seed * 1000 + self.epoch))

    def next(self):
        if self.index + self.batch > len(self.data):
            self.epoch, self.index = self.epoch + 1, 0
        rows = self.order()[self.index: self.index + self.batch]
        self.index += self.batch
        seqs = self.data[rows]
        return seqs[:, :-1], seqs[:, 1:]

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, sd):
        self.epoch, self.index, self.seed = sd["epoch"], sd["index"], sd["seed"]


class RNG:
    """The global torch RNG (dropout) as a stateful object."""

    def state_dict(self):
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, sd):
        torch.set_rng_state(sd["torch"])


def checkpoints(root: str) -> list[int]:
    found = [int(m.group(1)) for n in os.listdir(root) if (m := STEP_DIR.fullmatch(n))]
    return sorted(found)


def restore(root: str, state: dict) -> int:
    """Load the newest checkpoint that loads cleanly; its step, or 0."""
    for step in reversed(checkpoints(root)):
        path = os.path.join(root, f"step-{step:08d}")
        try:
            shardckpt.load(state, path)
            print(f"[train] resumed from {path}", flush=True)
            return state["step"]
        except shardckpt.CheckpointError as exc:
            print(f"[train] skipping {path}: {type(exc).__name__}: {exc}", flush=True)
    return 0


def save(root: str, state: dict, step: int, keep: int) -> None:
    state["step"] = step
    info = shardckpt.save(state, os.path.join(root, f"step-{step:08d}"),
                          metadata={"loss": state["loss"]})
    print(f"[train] saved step {step}: {info.raw_bytes / 2**20:.1f} MiB -> "
          f"{info.stored_bytes / 2**20:.1f} MiB in {info.seconds * 1e3:.0f} ms", flush=True)
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(os.path.join(root, f"step-{old:08d}"), ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=40)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep per step (lets a demo interrupt a fast run)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # the same kernels every run, so resumed runs are bit-exact
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    model = TinyLM()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = TokenStream(args.seed)
    state = {"model": model, "optim": optim, "data": data, "rng": RNG(), "step": 0, "loss": None}
    step = restore(args.checkpoint_dir, state)

    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
    t0 = time.time()
    while step < args.steps:
        tokens, targets = data.next()
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        optim.zero_grad()
        loss.backward()
        optim.step()
        step += 1
        state["loss"] = loss.item()
        if step % 20 == 0:
            print(f"[train] step {step} loss {state['loss']:.4f}", flush=True)
        if stop["signal"] is not None:
            save(args.checkpoint_dir, state, step, args.keep)
            print(f"[train] preempted (signal {stop['signal']}) at step {step}: saved, exiting",
                  flush=True)
            return 0
        if step % args.save_every == 0 or step == args.steps:
            save(args.checkpoint_dir, state, step, args.keep)
        time.sleep(args.step_sleep)
    print(f"[train] done: {step} steps, loss {state['loss']:.4f}, {time.time() - t0:.1f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
