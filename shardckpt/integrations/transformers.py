"""Hugging Face ``transformers.Trainer``: every checkpoint it writes is a shardckpt checkpoint.

    from shardckpt.integrations.transformers import ShardCkptTrainer
    trainer = ShardCkptTrainer(model=model, args=args, train_dataset=ds)   # for Trainer
    trainer.train(resume_from_checkpoint=True)     # the newest committed checkpoint-N

    class MySFT(ShardCkptTrainerMixin, SFTTrainer): ...   # any Trainer subclass

Each checkpoint the Trainer would write (``save_strategy`` "steps", "epoch", "best") goes to
``output_dir/checkpoint-{step}`` as one atomic shardckpt checkpoint holding the model, the
optimizer, the scheduler, the gradient scaler, every rank's RNG and the trainer state, saved in
the background (``shardckpt.async_save``, the optimizer as its guard: ``step()`` waits only for
the copy of what it changes). Once a checkpoint has committed, rank 0 writes
``trainer_state.json`` and ``config.json`` beside its manifest (FORMAT.md 1 lets writers leave
other files there) for HF's tools, then applies ``save_total_limit``: the newest, the one in
flight and the best (``metric_for_best_model``) are never removed. ``resume_from_checkpoint=True``
takes the newest *committed* checkpoint (a folder without a manifest is skipped), a path takes
exactly that one, on the same or another number of processes (per-rank RNG: ``per_rank``
"modulo"). Folders written by the plain Trainer still resume through the Trainer's own code.
Needs ``pip install 'shardckpt[transformers]'``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import warnings

from . import require

transformers = require("transformers", "transformers", "shardckpt.integrations.transformers")

import shardckpt  # noqa: E402
from ..dist import exchange  # noqa: E402
from ..format.root import DELETE_MARK, is_committed, remove_leftovers  # noqa: E402
from ..observe import REMOVED, SAVE_COMMITTED, emit  # noqa: E402
from ..storage import open_storage  # noqa: E402
from .accelerate import _RNG  # noqa: E402

__all__ = ["ShardCkptTrainer", "ShardCkptTrainerMixin", "committed_checkpoints"]

PREFIX = "checkpoint"
STATE_NAME = "trainer_state.json"
MANIFEST = "manifest.json"
_STEP = re.compile(rf"^{PREFIX}-(\d+)$")


class _DeferredRNG(_RNG):
    """Per-rank RNG that a load only stashes: the Trainer restores RNG later than the weights
    (after skipping the resumed epoch's batches), so ``apply`` runs where it would."""

    def __init__(self):
        self.saved = None

    def load_state_dict(self, state: dict) -> None:
        self.saved = state

    def apply(self) -> None:
        if self.saved is not None:
            _RNG.load_state_dict(self, self.saved)
            self.saved = None


def committed_checkpoints(run_dir: str, validate: bool = False) -> list[tuple[int, str]]:
    """``(step, path)`` of each committed shardckpt ``checkpoint-N`` in ``run_dir``, by step
    (``validate``: only those whose manifest parses and passes its checks)."""
    if not os.path.isdir(run_dir):
        return []
    storage = open_storage(run_dir)
    out = []
    for name in os.listdir(run_dir):
        m = _STEP.match(name)
        if m and os.path.isdir(os.path.join(run_dir, name)) and is_committed(
                storage, name, validate):
            out.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(out)


def _is_ours(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(
        os.path.join(os.fspath(path), MANIFEST))


def _native_complete(path: str) -> bool:
    """A plain Trainer's checkpoint: it writes trainer_state.json last."""
    return os.path.isfile(os.path.join(path, STATE_NAME)) and not _is_ours(path)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _remove(path: str) -> None:
    """Rename aside first, so no half-deleted ``checkpoint-N`` is ever seen."""
    aside = os.path.join(os.path.dirname(path),
                         f".{os.path.basename(path)}{DELETE_MARK}{secrets.token_hex(4)}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


class ShardCkptTrainerMixin:
    """Puts shardckpt under a ``transformers.Trainer`` subclass (list it first in the bases).

    Args:
        shardckpt_save_options: keyword arguments for every ``shardckpt.async_save``
            (``codec``, ``staging_budget_bytes``...).
        shardckpt_load_options: keyword arguments for ``shardckpt.load`` on resume
            (default ``per_rank="modulo"``: on another number of processes rank r takes the
            saved RNG of rank r % saved ranks).
        on_event: called with a ``shardckpt.observe.CheckpointEvent``: ``save_committed``
            (step, folder, epoch, the metrics logged at that step) as each checkpoint commits,
            on the background writer's thread, and ``removed`` for each folder
            ``save_total_limit`` deletes; a callback that raises is logged, never raised
            (``MLflowCheckpoints`` / ``WandbCheckpoints`` fit here).
    """

    def __init__(self, *args, shardckpt_save_options: dict | None = None,
                 shardckpt_load_options: dict | None = None, on_event=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_event = on_event
        self.shardckpt_save_options = dict(shardckpt_save_options or {})
        self.shardckpt_load_options = {"per_rank": "modulo", **(shardckpt_load_options or {})}
        self._sc_inflight = None  # (handle, folder, run_dir, trainer_state text)
        self._sc_rng: _DeferredRNG | None = None
        self.add_callback(_Finisher(self))

    # -- what a checkpoint holds -------------------------------------------------------------

    def _shardckpt_state(self, loading: bool = False) -> dict:
        """The live objects of a checkpoint (the inner optimizer: accelerate's wrapper never
        runs ``Optimizer.__init__``, so hooks on it would not fire)."""
        state = {"model": self.accelerator.unwrap_model(self.model)}
        if not self.args.save_only_model:
            opt = getattr(self.optimizer, "optimizer", self.optimizer)
            state.update(optimizer=opt, scheduler=self.lr_scheduler)
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
            state["rng"] = self._sc_rng if loading else _RNG()
        return state

    def _trainer_state_text(self) -> str:
        return json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"

    # -- saving --------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, as a shardckpt checkpoint saved in the background
        (DeepSpeed engines keep the Trainer's own checkpoints)."""
        if self.is_deepspeed_enabled:
            warnings.warn("shardckpt: DeepSpeed checkpoints stay the Trainer's own", stacklevel=2)
            return super()._save_checkpoint(model, trial)
        if self.args.push_to_hub:
            warnings.warn("shardckpt: intermediate checkpoints are not pushed to the Hub",
                          stacklevel=2)
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX}-{self.state.global_step}")
        self._shardckpt_finish(wait=True)
        self._note_best(run_dir)
        self._export_callback_states()
        self._clear_stale(folder)
        text = self._trainer_state_text()
        state = {**self._shardckpt_state(), "trainer_state": text}
        handle = shardckpt.async_save(state, folder, **self.shardckpt_save_options)
        self._sc_inflight = (handle, folder, run_dir, text)
        if self.on_event is not None:
            handle.add_done_callback(self._reporter(folder))

    def _reporter(self, folder: str):
        """The done callback reporting the commit of ``folder`` (the step's logged metrics:
        the Trainer evaluates before it saves)."""
        step, epoch = self.state.global_step, self.state.epoch
        metrics = {}
        for entry in self.state.log_history:
            if entry.get("step") == step:
                metrics.update({k: v for k, v in entry.items()
                                if k not in ("step", "epoch") and isinstance(v, (int, float))})

        def report(info, error) -> None:
            if error is None:
                emit(self.on_event, SAVE_COMMITTED, step, folder, epoch=epoch,
                     metrics=metrics or None, seconds=info.seconds, raw_bytes=info.raw_bytes,
                     stored_bytes=info.stored_bytes)
        return report

    def _note_best(self, run_dir: str) -> None:
        """Point ``best_model_checkpoint`` at the best step's folder: the one being saved now
        (still in flight) or a committed one."""
        best = self.state.best_global_step
        if best and self.args.save_strategy in ("steps", "epoch", "best"):
            path = os.path.join(run_dir, f"{PREFIX}-{best}")
            if best == self.state.global_step or _is_ours(path) or os.path.isdir(path):
                self.state.best_model_checkpoint = path

    def _export_callback_states(self) -> None:
        """As the Trainer does before writing trainer_state.json."""
        exportable = transformers.trainer_callback.ExportableState
        for cb in self.callback_handler.callbacks + [self.control]:
            if isinstance(cb, exportable):
                name, cb_state = cb.__class__.__name__, cb.state()
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(cb_state)
                else:
                    self.state.stateful_callbacks[name] = cb_state

    def _clear_stale(self, folder: str) -> None:
        """A folder of this step from an abandoned future (resumed from an older one) is
        replaced, as the Trainer would; every rank waits until rank 0 has moved it away."""
        if self.args.should_save and os.path.lexists(folder):
            _remove(folder)
        self._from_rank0(None)

    def _shardckpt_finish(self, wait: bool) -> None:
        """After the save in flight committed: rank 0 writes the HF files beside it and
        applies ``save_total_limit``. Without ``wait``, only if it is done already."""
        if self._sc_inflight is None:
            return
        handle, folder, run_dir, text = self._sc_inflight
        if not wait and not handle.done():
            return
        self._sc_inflight = None
        handle.result()  # raises what failed in the background
        if self.args.should_save:
            _write_text(os.path.join(folder, STATE_NAME), text)
            config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
            if config is not None and hasattr(config, "to_json_string"):
                _write_text(os.path.join(folder, "config.json"), config.to_json_string())
            self._rotate(run_dir)

    def _rotate(self, run_dir: str) -> None:
        """``save_total_limit`` as the Trainer counts it (the newest and the best are kept, so
        the limit is at least their number), over committed checkpoints only; the best is
        ``best_global_step``'s folder whether or not ``best_model_checkpoint`` was set."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        found = [os.path.abspath(p) for _, p in committed_checkpoints(run_dir)]
        if not found:
            return
        keep = {found[-1]}
        if self.state.best_model_checkpoint:
            keep.add(os.path.abspath(self.state.best_model_checkpoint))
        if self.state.best_global_step:
            keep.add(os.path.abspath(os.path.join(run_dir,
                                                  f"{PREFIX}-{self.state.best_global_step}")))
        remaining = len(found)
        for path in found:
            if remaining <= max(limit, len(keep & set(found))):
                break
            if path not in keep:
                _remove(path)
                remaining -= 1
                emit(self.on_event, REMOVED, int(_STEP.match(os.path.basename(path)).group(1)),
                     path, reason="save_total_limit")

    def _finalize_training(self, *args, **kwargs):
        self._shardckpt_finish(wait=True)
        return super()._finalize_training(*args, **kwargs)

    # -- resuming ------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest committed
        checkpoint (rank 0 decides for all), a path exactly that one."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._newest_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory "
                                 f"({self.args.output_dir})")
        if _is_ours(resume_from_checkpoint):
            self._restore_state_file(os.fspath(resume_from_checkpoint))
        self._sc_rng = _DeferredRNG()
        try:
            result = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                   **kwargs)
        except BaseException:
            try:  # the save in flight still commits; its own failure must not hide this one
                self._shardckpt_finish(wait=True)
            except Exception as exc:
                warnings.warn(f"shardckpt: the checkpoint in flight failed too: {exc}",
                              stacklevel=2)
            raise
        self._shardckpt_finish(wait=True)
        return result

    def _newest_checkpoint(self, run_dir: str) -> str | None:
        """Rank 0's newest committed shardckpt checkpoint or complete plain one, on all ranks."""
        choice = None
        if self.args.process_index == 0 and os.path.isdir(run_dir):
            remove_leftovers(open_storage(run_dir))  # what a killed save left: never committed
            steps = {step: path for step, path in committed_checkpoints(run_dir, True)}
            for name in os.listdir(run_dir):
                m, path = _STEP.match(name), os.path.join(run_dir, name)
                if m and _native_complete(path):
                    steps.setdefault(int(m.group(1)), path)
            choice = steps[max(steps)] if steps else None
        return self._from_rank0(choice)

    def _from_rank0(self, value):
        """Rank 0's ``value`` (JSON) on every rank, through the store (no pickle); every rank
        waits for all to arrive, so it is a barrier too."""
        return exchange().round("transformers-resume", value, None, lambda posts: posts[0])

    def _restore_state_file(self, path: str) -> None:
        """A checkpoint that committed but lost the race with a kill has no trainer_state.json
        yet; rank 0 writes it from the checkpoint before the Trainer reads it."""
        if self.args.process_index == 0 and not os.path.isfile(os.path.join(path, STATE_NAME)):
            text = shardckpt.load_full(path, key="trainer_state")
            _write_text(os.path.join(path, STATE_NAME), text)
        self._from_rank0(None)  # the others wait for it

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if _is_ours(resume_from_checkpoint):
            return None  # loaded with the optimizer, once it exists
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if not _is_ours(checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)
        state = {**self._shardckpt_state(loading=True), "trainer_state": ""}
        shardckpt.load(state, checkpoint, **self.shardckpt_load_options)
        return None

    def _load_scaler(self, checkpoint):
        if not _is_ours(checkpoint):
            return super()._load_scaler(checkpoint)
        return None

    def _load_rng_state(self, checkpoint):
        if not _is_ours(checkpoint):
            return super()._load_rng_state(checkpoint)
        if self._sc_rng is not None:
            self._sc_rng.apply()
        return None

    def _load_best_model(self):
        path = self.state.best_model_checkpoint
        self._shardckpt_finish(wait=True)
        if not _is_ours(path):
            return super()._load_best_model()
        weights = shardckpt.load_full(path, key="model")
        self.accelerator.unwrap_model(self.model).load_state_dict(weights)
        return None


class _Finisher(transformers.TrainerCallback):
    """Completes a committed background save within a step of its commit (HF files, limit)."""

    def __init__(self, trainer: ShardCkptTrainerMixin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._shardckpt_finish(wait=False)


class ShardCkptTrainer(ShardCkptTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints are shardckpt checkpoints (see the module)."""
