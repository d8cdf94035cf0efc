"""A torchtitan training loop in miniature on CPU gloo ranks: torchtitan's own ModelWrapper,
OptimizersContainer, LRSchedulersContainer and ParallelAwareDataloader, FSDP2 over the ranks,
and the checkpointer calls torchtitan's Trainer makes, in its order."""

from __future__ import annotations

import os
import signal

import torch
import torch.nn as nn


class Numbers(torch.utils.data.IterableDataset):
    """An endless stream of random rows, its position resumable (a rank's own seed)."""

    def __init__(self, rank: int):
        self.rank, self.position = rank, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.rank * 100_003 + self.position)
            self.position += 1
            yield torch.randn(16, generator=g)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class Trainer:
    """What torchtitan's Trainer checkpoints as ``train_state``."""

    def __init__(self):
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self):
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state):
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]


def build(rank: int, world: int, config, dump_folder: str):
    """(trainer, model, optimizers, lr schedulers, dataloader, checkpointer) as torchtitan's
    Trainer builds them."""
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 8))
    if world > 1 or os.environ.get("TITAN_FSDP1"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizers = default_adamw(lr=1e-2, implementation="for-loop").build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=3).build(optimizers=optimizers,
                                                                    training_steps=100)
    loader = ParallelAwareDataloader(Numbers(rank), dp_rank=rank, dp_world_size=world,
                                     batch_size=4)
    trainer = Trainer()
    checkpointer = config.build(dataloader=loader, model_parts=[model], optimizers=optimizers,
                                lr_schedulers=schedulers, states={"train_state": trainer},
                                sd_adapter=None, base_folder=dump_folder)
    return trainer, model, optimizers, schedulers, loader, checkpointer


def full(model) -> dict:
    """The model's full (unsharded) tensors."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def train(rank, world, config, dump_folder, steps, load_step=-1, kill_at=None, stop_at=None):
    """Load, then train to ``steps`` the way torchtitan's Trainer.train does (SIGTERM to the
    last rank after step ``kill_at``; stop after step ``stop_at``); returns (first step
    trained, losses, full model tensors at the end, lr, tokens seen)."""
    trainer, model, optimizers, schedulers, loader, ckpt = build(rank, world, config, dump_folder)
    ckpt.load(step=load_step)
    first = trainer.step + 1
    batches, losses = iter(loader), []
    while trainer.step < steps:
        trainer.step += 1
        x = next(batches)
        loss = model(x).pow(2).mean()
        loss.backward()
        ckpt.maybe_wait_for_staging()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        trainer.ntokens_seen += x.numel()
        losses.append(loss.item())
        if kill_at is not None and trainer.step == kill_at and rank == world - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        ckpt.save(trainer.step, last_step=trainer.step == steps)
        if trainer.step == stop_at:
            break  # a job that ends here without a last save (ckpt.close still flushes)
    ckpt.close()
    return first, losses, full(model), schedulers.schedulers[0].get_last_lr()[0], trainer.ntokens_seen
