"""The Trainer's own checkpoints against ShardCkptTrainer: time added per training step at saves.

Usage:
    python scripts/bench/hf_trainer.py [--hidden 256] [--layers 4] [--vocab 4096] [--steps 24]
                                       [--save-steps 4] [--procs 2] [--reps 2] [--codec auto]

Each rep launches torchrun with ``--procs`` CPU processes (gloo) three times, in alternating
order: ``transformers.Trainer`` without saving (the step time), the Trainer saving every
``--save-steps`` (its safetensors model, ``torch.save`` optimizer / scheduler / RNG, written
synchronously by rank 0), and ``ShardCkptTrainer`` with the same arguments (a background
shardckpt checkpoint per save, the optimizer as guard). Rank 0 times each step from one
``on_step_end`` to the next, so a step after a save includes that save's stall. Reported
(medians over reps): the median step time of steps without a save, the mean time a save step
took beyond it, and the whole ``train()`` wall (ShardCkptTrainer's includes waiting for its last
commit), and for ShardCkptTrainer the mean ``async_save`` stall (the call) and guard wait (the
optimizer's ``step()`` waiting for the copy). The model is a randomly initialised Llama (fp32);
checkpoint bytes are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import harness as bh  # noqa: E402

MODES = ("no saves", "Trainer", "ShardCkptTrainer")


def child(a) -> None:
    """One training run under torchrun; rank 0 writes its step times as JSON."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback,
                              TrainingArguments)

    from shardckpt.integrations.transformers import ShardCkptTrainer
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
        num_hidden_layers=a.layers, num_attention_heads=8, max_position_embeddings=128))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(
        0, a.vocab, (a.steps * 2 * a.procs, 64), generator=torch.Generator().manual_seed(0))]
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    saving = a.mode != "no saves"
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=2, max_steps=a.steps,
        save_strategy="steps" if saving else "no", save_steps=a.save_steps, logging_steps=1000,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    extra, handles = {}, []
    if a.mode == "ShardCkptTrainer":
        import shardckpt
        extra["shardckpt_save_options"] = {"codec": a.codec}
        start = shardckpt.async_save

        def recorded(*args, **kw):  # keeps each handle for its stall and guard-wait seconds
            handles.append(start(*args, **kw))
            return handles[-1]
        shardckpt.async_save = recorded
    cls = ShardCkptTrainer if a.mode == "ShardCkptTrainer" else Trainer
    trainer = cls(model=model, args=args, train_dataset=data, callbacks=[Clock()], **extra)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    if args.process_index == 0:
        with open(os.path.join(a.out, "times.json"), "w") as fh:
            json.dump({"stamps": stamps, "wall": wall,
                       "stall": sum(h.stall_seconds for h in handles) / max(len(handles), 1),
                       "guard_wait": sum(h.wait_seconds for h in handles) / max(len(handles), 1),
                       "ckpt_bytes": bh.disk_bytes(os.path.join(a.out, f"checkpoint-{a.steps}"))
                       if saving else 0}, fh)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank is past its last collective
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown at interpreter exit can abort or hang a rank


def summarize(doc: dict, save_steps: int) -> dict:
    """Step times from the stamps: step k+1's interval holds step k's save (k % save_steps == 0)."""
    stamps = doc["stamps"]
    plain, saves = [], []
    for k in range(2, len(stamps)):  # the interval ending at step k+1 (1-based), after step k
        step_before = k  # 1-based step whose end starts this interval
        (saves if step_before % save_steps == 0 else plain).append(stamps[k] - stamps[k - 1])
    base = statistics.median(plain)
    return {"step": base, "added": statistics.mean(saves) - base if saves else 0.0,
            "wall": doc["wall"], "bytes": doc["ckpt_bytes"], "stall": doc["stall"],
            "guard_wait": doc["guard_wait"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--codec", default="auto", help="ShardCkptTrainer's codec (auto, zstd, raw)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    records: dict[str, list] = {m: [] for m in MODES}
    from shardckpt.testing.ranks import free_port
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for rep in range(a.reps):
            for mode in bh.rotated(list(MODES), rep):
                out = os.path.join(tmp, f"{rep}-{bh.slug(mode)}")
                cmd = [sys.executable, "-m", "torch.distributed.run",
                       f"--nproc_per_node={a.procs}", f"--master_port={free_port()}",
                       os.path.abspath(__file__), "--child", "--mode", mode, "--out", out]
                cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                        if k in ("hidden", "layers", "vocab", "steps", "save_steps", "procs", "codec")]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": bh.REPO}
                run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                if run.returncode:
                    raise SystemExit(f"{mode} failed:\n{run.stderr[-3000:]}")
                with open(os.path.join(out, "times.json")) as fh:
                    records[mode].append(summarize(json.load(fh), a.save_steps))
                bh.log(f"rep {rep} {mode}: {records[mode][-1]}")
                bh.remove(out)
    print(f"Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab} (fp32), {a.procs} CPU "
          f"processes under torchrun, {a.steps} steps, a save every {a.save_steps}; "
          f"{a.reps} reps (medians)")
    rows = [[m, bh.fmt(bh.med(r, "step"), ".3f"), bh.fmt(bh.med(r, "added"), ".3f"),
             bh.fmt(bh.med(r, "wall"), ".2f"), bh.fmt(bh.med(r, "bytes") / bh.MIB, ".1f"),
             bh.fmt(bh.med(r, "stall"), ".3f") if m == "ShardCkptTrainer" else "-",
             bh.fmt(bh.med(r, "guard_wait"), ".3f") if m == "ShardCkptTrainer" else "-"]
            for m, r in records.items()]
    print(bh.table(["run", "step s", "added per save step s", "train() s", "checkpoint MiB",
                    "async_save stall s", "step() wait s"], rows))


if __name__ == "__main__":
    main()
