"""A plain PyTorch training loop checkpointed with ``shardckpt.CheckpointManager``.

    python docs/examples/plain_loop.py --root /tmp/plain-ckpt --max-steps 300
    # send SIGTERM (or Ctrl-C is not it: use `kill -TERM <pid>`) mid-run: it saves and exits 75;
    # run the same command again: it resumes from the newest checkpoint that loads.

Walked through in docs/plain_pytorch.md.
"""

import argparse
import logging
import random
import sys

import torch

import shardckpt


class Progress:
    """The loop's own position (step and data cursor) as a stateful object."""

    def __init__(self):
        self.step, self.cursor = 0, 0

    def state_dict(self):
        return {"step": self.step, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.step, self.cursor = state["step"], state["cursor"]


class RNG:
    """The generators the loop draws from, so a resumed run draws the same numbers."""

    def state_dict(self):
        return {"torch": torch.get_rng_state(), "python": random.getstate()}

    def load_state_dict(self, state):
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    torch.manual_seed(0)
    data = torch.randn(4096, 32), torch.randn(4096, 1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.max_steps)
    progress = Progress()
    state = {"model": model, "optim": opt, "sched": sched, "progress": progress, "rng": RNG()}

    def on_event(event):  # one place to see every save, removal, restore, preemption
        if event.kind == "save_committed":
            print(f"[ckpt] step {event.step}: {event.stored_bytes} bytes stored, "
                  f"ratio {event.ratio:.2f}x, {event.seconds:.2f} s")

    with shardckpt.CheckpointManager(args.root, every_n_steps=args.every, keep_last=2,
                                     keep_best=1, monitor="val_loss", mode="min",
                                     on_event=on_event) as mgr:
        resumed = mgr.restore(state)  # None on a fresh start
        print(f"[train] {'resumed at step ' + str(resumed) if resumed else 'fresh start'}")
        while progress.step < args.max_steps:
            idx = torch.arange(progress.cursor, progress.cursor + 64) % len(data[0])
            loss = torch.nn.functional.mse_loss(model(data[0][idx]), data[1][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            progress.step, progress.cursor = progress.step + 1, progress.cursor + 64
            metrics = None
            if progress.step % args.every == 0:
                with torch.no_grad():
                    metrics = {"val_loss": torch.nn.functional.mse_loss(
                        model(data[0][:512]), data[1][:512]).item()}
                print(f"step={progress.step} loss={loss.item():.5f} {metrics}")
            mgr.maybe_save(progress.step, state, metrics=metrics)
            if mgr.preempted:  # SIGTERM: every rank saved this step and committed
                print(f"[train] preempted at step {progress.step}; checkpoint committed")
                sys.exit(shardckpt.EXIT_PREEMPTED)
        print(f"[train] done; best checkpoint: step {mgr.best_step()}")


if __name__ == "__main__":
    main()
