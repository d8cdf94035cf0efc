"""A tiny Llama fine-tune under ShardCkptTrainer, launched as users do (python or torchrun).

    python tests/integrations/hf_trainer_job.py OUT [--kill-at N] [--resume] [--batch B]

Every rank trains a 2-layer Llama (hidden 32) initialised from seed 0 on 48 fixed sequences,
saves every 3 steps (save_total_limit 2) and, with ``--kill-at N``, SIGKILLs itself after step
N. Rank 0 writes the final weights to ``OUT/final.safetensors`` and what it resumed from to
``OUT/resumed.txt``.
"""

import argparse
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

    from shardckpt.integrations.transformers import ShardCkptTrainer

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)  # the same arithmetic in every run
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attention_dropout=a.dropout))

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch, num_train_epochs=2,
        save_strategy="steps", save_steps=3, save_total_limit=2, logging_steps=1,
        learning_rate=1e-3, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = ShardCkptTrainer(model=model, args=args, train_dataset=Tokens(),
                               callbacks=[Kill()])
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    if args.process_index == 0:
        weights = {k: v.contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(weights, os.path.join(a.out, "final.safetensors"))
        with open(os.path.join(a.out, "resumed.txt"), "w") as fh:
            fh.write(str(trainer.state.global_step))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank is past its last collective
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown at interpreter exit can abort or hang a rank


class Tokens(torch.utils.data.Dataset):
    """48 fixed sequences of 16 tokens (no padding: the loss is the same mean on any split)."""

    def __len__(self):
        return 48

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


if __name__ == "__main__":
    main()
