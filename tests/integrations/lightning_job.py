"""A tiny Lightning training job for the plugin tests (run as a script, also under DDP).

    python lightning_job.py OUT_DIR MODE DEVICES [KILL_AT]

MODE ``reshard``: only load OUT_DIR/ckpt/last.ckpt (validate) and write the weights. ``run``: fit
from scratch (killing the whole process group, as a preemption would, once
``KILL_AT`` steps are done and checkpointed); ``resume``: fit with ``ckpt_path="last"``, then
(in the same processes, to pay the imports once) an uninterrupted reference fit in OUT_DIR/ref.
Rank 0 appends ``{"step", "loss"}`` lines to losses-MODE.jsonl and writes the final weights, best
and kept checkpoints to weights-MODE.json.
"""

import json
import os
import signal
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from shardckpt.integrations.lightning import (AsyncShardCkptIO, ShardCkptIO,
                                              ShardCkptModelParallelStrategy)

STEPS, BATCHES_PER_EPOCH = 12, 4  # checkpoints at epoch ends: plain loaders resume exactly


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 1))

    def configure_model(self):
        if isinstance(self.trainer.strategy, ShardCkptModelParallelStrategy):
            from torch.distributed.fsdp import fully_shard
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)]


class Record(Callback):
    def __init__(self, out, mode, kill_at):
        self.path, self.kill_at = os.path.join(out, f"losses-{mode}.jsonl"), kill_at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": trainer.global_step,
                                     "loss": outputs["loss"].item()}) + "\n")

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == int(os.environ.get("JOB_REQUEUE_AT", -1)):
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal=USR1: Lightning's requeue
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            trainer.strategy.checkpoint_io.teardown()  # (async) that checkpoint committed
            trainer.strategy.barrier()
            os.killpg(os.getpgid(0), signal.SIGKILL)  # the whole job, mid-training


def main(out, mode, devices, kill_at=None, async_io="0"):
    g = torch.Generator().manual_seed(1)
    n = 8 * BATCHES_PER_EPOCH * devices
    data = TensorDataset(torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g))
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), monitor="val_loss", mode="min",
                           save_top_k=2, every_n_train_steps=BATCHES_PER_EPOCH, save_last=True)
    plugin = AsyncShardCkptIO() if async_io == "1" else ShardCkptIO()
    strategy = "ddp" if devices > 1 else "auto"
    if async_io == "fsdp2":  # sharded checkpoints through the strategy (plugin unused)
        strategy = ShardCkptModelParallelStrategy(data_parallel_size=devices,
                                                  tensor_parallel_size=1)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=devices,
                        default_root_dir=out, strategy=strategy, plugins=[plugin],
                        callbacks=[Record(out, mode, kill_at), ckpt], logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    if mode == "reshard":  # load the (2-rank) last.ckpt into this world size's sharding
        trainer.validate(Tiny(), DataLoader(data, batch_size=16),
                         ckpt_path=os.path.join(out, "ckpt", "last.ckpt"))
    else:
        trainer.fit(Tiny(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=16),
                    ckpt_path="last" if mode == "resume" else None)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).double().flatten().tolist()
               for k, v in trainer.model.state_dict().items()}  # (gathering is collective)
    if trainer.is_global_zero:
        with open(os.path.join(out, f"weights-{mode}.json"), "w") as fh:
            json.dump({"weights": weights, "best": ckpt.best_model_path,
                       "kept": sorted(os.listdir(os.path.join(out, "ckpt")))}, fh)


if __name__ == "__main__":
    out, mode, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kill = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    main(out, mode, devices, kill, *(sys.argv[5:6]))
    if mode == "resume":
        os.makedirs(os.path.join(out, "ref"), exist_ok=True)
        main(os.path.join(out, "ref"), "run", devices, None, *(sys.argv[5:6]))
