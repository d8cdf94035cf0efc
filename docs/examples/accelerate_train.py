"""Hugging Face Accelerate training whose save_state / load_state go through shardckpt.

    python docs/examples/accelerate_train.py --root /tmp/acc-ckpt --max-steps 60
    accelerate launch --cpu --num_processes 2 docs/examples/accelerate_train.py --root /tmp/acc2

Run it twice: the second run resumes from the newest checkpoint (model, optimizer, scheduler,
RNG, the registered Progress object, the loader's epoch) and continues. See docs/accelerate.md.
"""

import argparse
import os

import torch
from accelerate import Accelerator

from shardckpt.integrations.accelerate import load_state, save_state


class Progress:
    """Registered with ``register_for_checkpointing``: the step and the batch within the epoch."""

    def __init__(self):
        self.step, self.batch = 0, 0

    def state_dict(self):
        return {"step": self.step, "batch": self.batch}

    def load_state_dict(self, state):
        self.step, self.batch = state["step"], state["batch"]


def newest(root):
    steps = sorted(int(n.split("-")[1]) for n in os.listdir(root) if n.startswith("step-")) \
        if os.path.isdir(root) else []
    return os.path.join(root, f"step-{steps[-1]:08d}") if steps else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20)
    args = p.parse_args()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(512, 16), torch.randn(512, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=25, gamma=0.5)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    last = newest(args.root)
    if last:
        load_state(accelerator, last)  # every process; reshards nothing here (DDP replicas)
        accelerator.print(f"resumed from {last} at step {progress.step}")
    while progress.step < args.max_steps:
        # a plain loader restarts its epoch: skip what this epoch already consumed
        epoch = accelerator.skip_first_batches(loader, progress.batch) if progress.batch else loader
        for x, y in epoch:
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            progress.step, progress.batch = progress.step + 1, progress.batch + 1
            if progress.step % args.every == 0:
                save_state(accelerator, os.path.join(args.root, f"step-{progress.step:08d}"))
                accelerator.print(f"step={progress.step} loss={loss.item():.5f} (saved)")
            if progress.step >= args.max_steps:
                break
        else:
            progress.batch = 0  # the epoch ended
    accelerator.print("done")


if __name__ == "__main__":
    main()
