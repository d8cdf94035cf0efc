"""ShardCkptTrainer / ShardCkptTrainerMixin with the real ``transformers.Trainer`` on a tiny
randomly initialised Llama: checkpoints, save_total_limit with the best kept, load_best_model_at_end,
resume from the newest committed checkpoint or a path, an SFTTrainer-shaped subclass, and kill -9
under torchrun resumed bit for bit (same world size) and within 1e-6 (another one)."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs shardckpt[transformers]")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = os.path.join(ROOT, "tests", "integrations", "hf_trainer_job.py")


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def _args(out, **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2,
                save_strategy="steps", save_steps=2, logging_steps=1, learning_rate=1e-3,
                report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoints_limit_keeps_best_and_loads_it(tmp_path):
    """Every save a shardckpt checkpoint with trainer_state.json beside it; save_total_limit=2
    keeps the newest and the best (step 2, by a scripted metric), and load_best_model_at_end
    loads step 2's weights."""
    import shardckpt
    from shardckpt.integrations.transformers import ShardCkptTrainer
    scripted = {2: 0.1, 4: 0.5, 6: 0.3, 8: 0.9, 10: 0.8, 12: 0.7}
    trainer = None

    def metrics(_):
        return {"score": scripted[trainer.state.global_step]}

    trainer = ShardCkptTrainer(
        model=_model(), train_dataset=Tokens(), eval_dataset=Tokens(4),
        compute_metrics=metrics,
        args=_args(tmp_path, eval_strategy="steps", eval_steps=2, save_total_limit=2,
                   load_best_model_at_end=True, metric_for_best_model="score",
                   greater_is_better=False))
    trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-12", "checkpoint-2"]
    for name in ("checkpoint-2", "checkpoint-12"):
        assert {"manifest.json", "trainer_state.json", "config.json"} <= set(
            os.listdir(tmp_path / name))
        shardckpt.verify(tmp_path / name)
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = shardckpt.load_full(tmp_path / "checkpoint-2", key="model")
    _same(best, _weights(trainer.model))
    saved = shardckpt.load_full(tmp_path / "checkpoint-12")
    assert set(saved) == {"model", "optimizer", "scheduler", "rng", "trainer_state"}
    assert '"global_step": 12' in saved["trainer_state"]


def test_epoch_and_best_strategies_and_save_only_model(tmp_path):
    """save_strategy "epoch" (2 steps an epoch) with save_only_model: model and trainer state
    only; "best": a checkpoint only at a new best metric."""
    import shardckpt
    from shardckpt.integrations.transformers import ShardCkptTrainer
    ShardCkptTrainer(model=_model(), train_dataset=Tokens(8),
                     args=_args(tmp_path / "epoch", save_strategy="epoch",
                                save_only_model=True)).train()
    assert sorted(os.listdir(tmp_path / "epoch")) == ["checkpoint-2", "checkpoint-4"]
    assert set(shardckpt.load_full(tmp_path / "epoch" / "checkpoint-4")) == {
        "model", "trainer_state"}
    scripted = {2: 0.5, 4: 0.3, 6: 0.6, 8: 0.2}
    trainer = None

    def metrics(_):
        return {"score": scripted[trainer.state.global_step]}

    trainer = ShardCkptTrainer(
        model=_model(), train_dataset=Tokens(16), eval_dataset=Tokens(4),
        compute_metrics=metrics,
        args=_args(tmp_path / "best", save_strategy="best", eval_strategy="steps",
                   eval_steps=2, metric_for_best_model="score", greater_is_better=False))
    trainer.train()
    assert sorted(os.listdir(tmp_path / "best")) == ["checkpoint-2", "checkpoint-4",
                                                      "checkpoint-8"]


class TinySFTTrainer:
    """Shaped like TRL's SFTTrainer: a Trainer subclass that takes raw text, tokenizes it in
    its constructor (bytes as tokens here) and overrides ``compute_loss``."""

    @staticmethod
    def make(base):
        class SFT(base):
            def __init__(self, *a, train_texts=(), max_length=16, **kw):
                data = [self._tokenize(t, max_length) for t in train_texts]
                super().__init__(*a, train_dataset=data, **kw)

            @staticmethod
            def _tokenize(text, n):
                ids = torch.tensor(list(text.encode())[:n], dtype=torch.long) % 64
                return {"input_ids": ids, "labels": ids.clone()}

            def compute_loss(self, model, inputs, return_outputs=False, **kw):
                out = model(**inputs)
                return (out.loss, out) if return_outputs else out.loss
        return SFT


def _texts():
    return [f"example number {i:03d} of the corpus" for i in range(24)]


class _StopAt:
    def __init__(self, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(cb, args, state, control, **kw):
                if state.global_step == step:
                    control.should_training_stop = True
        self.callback = Stop()


def test_sft_shaped_subclass_resumes_bit_exact(tmp_path):
    """The mixin on a Trainer subclass: stopped after step 5 (checkpoint-4 committed), resumed
    by resume_from_checkpoint=True past a newer half-written folder, and by path; both end
    with the uninterrupted run's weights."""
    import transformers
    from shardckpt.integrations.transformers import ShardCkptTrainerMixin
    sft = TinySFTTrainer.make(transformers.Trainer)

    class ShardCkptSFT(ShardCkptTrainerMixin, sft):
        pass

    def run(out, resume=None, stop=None):
        cbs = [_StopAt(stop).callback] if stop else []
        trainer = ShardCkptSFT(model=_model(), args=_args(out), train_texts=_texts(),
                               callbacks=cbs)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = _weights(run(tmp_path / "full").model)
    run(tmp_path / "cut", stop=5)
    assert sorted(os.listdir(tmp_path / "cut"))[-1] == "checkpoint-4"
    shutil.copytree(tmp_path / "cut", tmp_path / "bypath")
    (tmp_path / "cut" / "checkpoint-99" / "data").mkdir(parents=True)  # never committed
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed.state.global_step == 12
    _same(full, _weights(resumed.model))
    _same(full, _weights(run(tmp_path / "bypath",
                             resume=str(tmp_path / "bypath" / "checkpoint-4")).model))


@pytest.mark.slow  # ~18 s, mostly importing trl, datasets and pyarrow; the SFTTrainer-shaped
def test_trl_sft_trainer_resumes_bit_exact(tmp_path):  # subclass above is its fast sample
    """TRL's own SFTTrainer under the mixin, offline (a word-level tokenizer made here): its
    checkpoints are shardckpt's, and resume_from_checkpoint=True after losing the newest one
    ends with the same weights."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from shardckpt.integrations.transformers import ShardCkptTrainerMixin

    class ShardCkptSFT(ShardCkptTrainerMixin, SFTTrainer):
        pass

    vocab = {f"w{i}": i for i in range(60)} | {"[UNK]": 60, "[PAD]": 61, "[EOS]": 62}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]",
                                        pad_token="[PAD]", eos_token="[EOS]")
    data = Dataset.from_dict({"text": [" ".join(f"w{(i * 7 + j) % 60}" for j in range(12))
                                       for i in range(24)]})

    def run(resume=None):
        args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6,
                         save_steps=2, report_to=[], use_cpu=True, max_length=16,
                         disable_tqdm=True)
        trainer = ShardCkptSFT(model=_model(), args=args, train_dataset=data,
                               processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = _weights(run().model)
    assert (tmp_path / "checkpoint-6" / "manifest.json").exists()
    shutil.rmtree(tmp_path / "checkpoint-6")
    resumed = run(resume=True)
    assert resumed.state.global_step == 6
    _same(full, _weights(resumed.model))


def _launch(out, nproc, *extra, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    if nproc == 1:
        cmd = [sys.executable, JOB, str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", JOB, str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _final(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "final.safetensors"))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Under torchrun with 2 CPU processes: an uninterrupted run, and a run SIGKILLed after
    step 10 (checkpoint-9 in flight or committed), resumed on 2 processes and on 1."""
    from shardckpt.testing.ranks import free_port
    root = tmp_path_factory.mktemp("ddp")
    ref = _launch(root / "ref", 2, port=free_port())
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _launch(root / "cut", 2, "--kill-at", "10", port=free_port())
    assert killed.returncode != 0
    shutil.copytree(root / "cut", root / "cut1")
    resumed = _launch(root / "cut", 2, "--resume", port=free_port())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root


def test_ddp_kill9_resume_bit_exact(ddp_runs):
    _same(_final(ddp_runs / "ref"), _final(ddp_runs / "cut"))
    assert not [n for n in os.listdir(ddp_runs / "cut") if n.startswith(".")]  # swept


@pytest.mark.slow  # 15 s more on top of the fixture's three torchrun launches
def test_ddp_checkpoint_resumes_on_one_process(ddp_runs):
    """The 2-process checkpoint on 1 process with twice the batch: the same global batches,
    weights within 1e-6 of the uninterrupted 2-process run."""
    done = _launch(ddp_runs / "cut1", 1, "--resume", "--batch", "4", port=0)
    assert done.returncode == 0, done.stderr[-3000:]
    ref, got = _final(ddp_runs / "ref"), _final(ddp_runs / "cut1")
    for k in ref:
        assert ((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)) <= 1e-6, k


@pytest.mark.slow
def test_single_process_kill9_resume_bit_exact(tmp_path):
    ref = _launch(tmp_path / "ref", 1, "--dropout", "0.1", port=0)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert _launch(tmp_path / "cut", 1, "--dropout", "0.1", "--kill-at", "10",
                   port=0).returncode != 0
    done = _launch(tmp_path / "cut", 1, "--dropout", "0.1", "--resume", port=0)
    assert done.returncode == 0, done.stderr[-3000:]
    _same(_final(tmp_path / "ref"), _final(tmp_path / "cut"))
