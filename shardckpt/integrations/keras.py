"""Keras 3 callbacks that checkpoint ``fit`` with shardckpt (on the torch backend).

    from shardckpt.integrations.keras import ShardCkptBackupAndRestore, ShardCkptCheckpoint
    model.fit(x, y, epochs=20, validation_data=(vx, vy), callbacks=[
        ShardCkptCheckpoint("ckpt/best", monitor="val_loss", mode="min", save_best_only=True),
        ShardCkptBackupAndRestore("ckpt/backup")])   # a killed fit continues where it was

``ShardCkptCheckpoint`` takes ``keras.callbacks.ModelCheckpoint``'s arguments (a ``directory``
of checkpoints instead of one file name) plus ``max_to_keep``; ``ShardCkptBackupAndRestore``
keeps ``keras.callbacks.BackupAndRestore``'s contract and also restores the optimizer. Each
checkpoint is a shardckpt folder ``step-<batches trained>`` written by a
``shardckpt.CheckpointManager`` (atomic, checksummed, loaded without unpickling) holding the
model's variables in ``model.trainable_variables`` / ``non_trainable_variables`` /
``optimizer.variables`` order, and the epoch. Needs ``pip install 'shardckpt[keras]'`` and
``KERAS_BACKEND=torch``.
"""

from __future__ import annotations

import os
import shutil
import warnings

from . import require

keras = require("keras", "keras", "ShardCkptCheckpoint")

from ..manage import CheckpointManager  # noqa: E402
from ..policy import EveryNEpochs, EveryNSteps, KeepLast, OnImprovement  # noqa: E402

__all__ = ["ShardCkptCheckpoint", "ShardCkptBackupAndRestore"]

GROUPS = ("trainable", "non_trainable", "optimizer")
# The manager each directory has in this process. Keras calls no callback when ``fit`` raises,
# so a fit stopped by an exception leaves its manager open, holding the root's lease; the next
# callback on that directory (a retry in the same process) closes it first.
_OPEN: dict[str, CheckpointManager] = {}


def _variables(model, group: str) -> list:
    if group == "optimizer":
        return list(model.optimizer.variables) if model.optimizer is not None else []
    return list(getattr(model, f"{group}_variables"))


def keras_state(model, epoch: int, groups=GROUPS) -> dict:
    """What a checkpoint holds: the variables' tensors by group, in Keras' order, and the epoch
    (the number of epochs completed)."""
    _require_torch_backend()
    return {"keras": {g: [v.value for v in _variables(model, g)] for g in groups},
            "epoch": epoch}


def load_into(model, manager: CheckpointManager, step: int | None = None) -> int | None:
    """Restore the newest checkpoint (or ``step``) into ``model``; the epoch it recorded, or
    None without a checkpoint. The optimizer is built first so its variables exist.

    Raises:
        StateMismatchError: the checkpoint's variables do not fit the model's (count, shape,
            dtype), listed all at once; the model is untouched.
    """
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    state = {"keras": {g: [v.value.detach().clone() for v in _variables(model, g)]
                       for g in GROUPS}, "epoch": 0}
    saved = manager.restore(state, step=step)
    if saved is None:
        return None
    for group in GROUPS:
        for variable, value in zip(_variables(model, group), state["keras"][group]):
            variable.assign(value)
    return int(state["epoch"])


def open_manager(directory: str, **options) -> CheckpointManager:
    """A ``CheckpointManager`` on ``directory``, after closing one this process left open."""
    key = os.path.abspath(directory) if "://" not in directory else directory
    stale = _OPEN.pop(key, None)
    if stale is not None:
        try:
            stale.close()
        except Exception as exc:  # its save failed with the fit: say so, the retry goes on
            warnings.warn(f"shardckpt: closing the manager an interrupted fit left on "
                          f"{directory}: {type(exc).__name__}: {exc}", stacklevel=3)
    _OPEN[key] = manager = CheckpointManager(directory, **options)
    return manager


def close_manager(manager: CheckpointManager | None) -> None:
    """Close ``manager`` and forget it."""
    if manager is None:
        return
    for key, held in list(_OPEN.items()):
        if held is manager:
            del _OPEN[key]
    manager.close()


def _require_torch_backend() -> None:
    if keras.backend.backend() != "torch":
        raise RuntimeError(f"shardckpt's Keras callbacks need KERAS_BACKEND=torch, not "
                           f"{keras.backend.backend()!r}")


def _iterations(model) -> int:
    """Batches trained so far (the optimizer's counter survives a restore)."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _direction(model, monitor: str, mode: str) -> str:
    """"min" or "max" for ``monitor``; "auto" follows Keras (losses go down, a metric's own
    direction otherwise)."""
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ValueError(f"mode must be 'auto', 'min' or 'max', not {mode!r}")
    name = monitor.removeprefix("val_")
    if name == "loss":
        return "min"
    for metric in _metrics(model):
        if metric.name == name and hasattr(metric, "_direction"):
            return "max" if metric._direction == "up" else "min"
    raise ValueError(f"cannot tell whether {monitor!r} should go up or down: pass mode='max' "
                     "or mode='min'")


def _metrics(model) -> list:
    found = []
    for metric in getattr(model, "metrics", []):
        found.extend(getattr(metric, "metrics", None) or [metric])
    return found


class ShardCkptCheckpoint(keras.callbacks.Callback):
    """``keras.callbacks.ModelCheckpoint`` writing shardckpt checkpoints into ``directory``.

    Args:
        directory: the checkpoints' folder (a ``CheckpointManager`` root; local or URL).
        monitor: the log to compare with ``save_best_only`` and to rank checkpoints by.
        verbose: 1 prints a line per save.
        save_best_only: save only when ``monitor`` improved on the best so far (the best of the
            checkpoints already in ``directory`` counts: it survives restarts). A missing
            ``monitor`` skips the save with a warning naming it, as Keras does.
        save_weights_only: leave the optimizer's variables out.
        mode: ``"auto"``, ``"min"`` or ``"max"``.
        save_freq: ``"epoch"`` or a number of batches.
        initial_value_threshold: with ``save_best_only``, the value to beat at first.
        max_to_keep: keep the newest N checkpoints (None: all).
        manager_options: more ``CheckpointManager`` keywords (``save_options``, ``on_event``).
    """

    def __init__(self, directory, monitor: str = "val_loss", verbose: int = 0,
                 save_best_only: bool = False, save_weights_only: bool = False,
                 mode: str = "auto", save_freq="epoch", initial_value_threshold=None,
                 max_to_keep: int | None = None, manager_options: dict | None = None):
        super().__init__()
        if save_freq != "epoch" and not (isinstance(save_freq, int) and save_freq > 0):
            raise ValueError(f"save_freq must be 'epoch' or a positive int, not {save_freq!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', not {mode!r}")
        self.directory, self.monitor, self.verbose = str(directory), monitor, verbose
        self.save_best_only, self.save_weights_only = save_best_only, save_weights_only
        self.mode, self.save_freq, self.max_to_keep = mode, save_freq, max_to_keep
        self.initial_value_threshold = initial_value_threshold
        self.best = initial_value_threshold
        self.manager_options = dict(manager_options or {})
        self.manager: CheckpointManager | None = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self._close()
        self.best = self.initial_value_threshold
        direction = _direction(self.model, self.monitor, self.mode)
        rule = EveryNEpochs(1) if self.save_freq == "epoch" else EveryNSteps(self.save_freq)
        if self.save_best_only:  # the manager's policy: the best so far is read from the root
            rule = rule & OnImprovement(self.monitor, direction)
        self._better = (lambda v, ref: v < ref) if direction == "min" else \
            (lambda v, ref: v > ref)
        self.manager = open_manager(
            self.directory, save=rule, keep=KeepLast(self.max_to_keep) if self.max_to_keep
            else None, monitor=self.monitor, mode=direction, handle_preemption=False,
            **self.manager_options)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq != "epoch":
            self._offer(self._epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._offer(epoch + 1, logs)

    def _offer(self, epoch: int, logs) -> None:
        """Hand the manager this point of the fit; its save rule decides."""
        logs = dict(logs or {})
        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))
                   or hasattr(v, "item")}
        if self.save_best_only:
            current = metrics.get(self.monitor)
            if current is None:  # Keras warns and skips; the rule would raise
                warnings.warn(f"ShardCkptCheckpoint: save_best_only needs {self.monitor!r} "
                              f"in the logs (it has {sorted(logs)}); skipping this save",
                              stacklevel=2)
                return
            if self.best is not None and not self._better(current, self.best):
                return  # initial_value_threshold not beaten yet
        groups = GROUPS[:2] if self.save_weights_only else GROUPS
        step = _iterations(self.model)
        if self.manager.maybe_save(step, keras_state(self.model, epoch, groups),
                                   metrics=metrics, epoch=epoch):
            if self.save_best_only:
                self.best = None  # the threshold is beaten; the root's best rules from now
            if self.verbose:
                print(f"ShardCkptCheckpoint: saved {self.manager.path(step)}")

    def on_train_end(self, logs=None):
        self._close()

    def _close(self) -> None:
        manager, self.manager = self.manager, None
        close_manager(manager)


class ShardCkptBackupAndRestore(keras.callbacks.Callback):
    """``keras.callbacks.BackupAndRestore`` with shardckpt: a ``fit`` that was stopped resumes
    with the weights, the optimizer's variables and the epoch of the last backup.

    Args:
        backup_dir: the backups' folder; no other run or callback may use it.
        save_freq: ``"epoch"`` or a number of batches.
        double_checkpoint: keep the previous backup too (restore falls back to it when the
            newest is damaged).
        delete_checkpoint: remove ``backup_dir`` when ``fit`` completes (not when it was
            stopped by a preemption signal).
        handle_preemption: on SIGTERM, back up at the next batch and stop ``fit``
            (``preempted`` is then true; exit with ``shardckpt.EXIT_PREEMPTED``).
        manager_options: more ``CheckpointManager`` keywords.
    """

    def __init__(self, backup_dir, save_freq="epoch", double_checkpoint: bool = False,
                 delete_checkpoint: bool = True, handle_preemption: bool = True,
                 manager_options: dict | None = None):
        super().__init__()
        if not backup_dir:
            raise ValueError("Empty `backup_dir` argument passed")
        if save_freq != "epoch" and not (isinstance(save_freq, int) and save_freq > 0):
            raise ValueError(f"save_freq must be 'epoch' or a positive int, not {save_freq!r}")
        self.backup_dir, self.save_freq = str(backup_dir), save_freq
        self.double_checkpoint, self.delete_checkpoint = double_checkpoint, delete_checkpoint
        self.handle_preemption = handle_preemption
        self.manager_options = dict(manager_options or {})
        self.manager: CheckpointManager | None = None
        self.preempted = False
        self.restored_epoch: int | None = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        if not self.model.built:
            raise ValueError("To use ShardCkptBackupAndRestore, the model must be built "
                             "before fit() (call it on a batch of data)")
        self._close()
        self.preempted = False
        self.manager = open_manager(
            self.backup_dir, keep_last=2 if self.double_checkpoint else 1,
            every_n_steps=self.save_freq if isinstance(self.save_freq, int) else None,
            handle_preemption=self.handle_preemption, **self.manager_options)
        self.restored_epoch = load_into(self.model, self.manager)
        self._epoch = self.restored_epoch or 0
        if self.restored_epoch is not None:
            self.model._initial_epoch = self.restored_epoch  # what Keras' own callback sets

    def on_train_batch_end(self, batch, logs=None):
        # Every batch: the manager saves when save_freq batches are due or a signal arrived.
        self.manager.maybe_save(_iterations(self.model), keras_state(self.model, self._epoch))
        if self.manager.preempted:
            self.preempted = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        if self.save_freq == "epoch" and not self.preempted:
            self.manager.save(_iterations(self.model), keras_state(self.model, self._epoch))

    def on_train_end(self, logs=None):
        self._close()
        if self.delete_checkpoint and not self.preempted:
            shutil.rmtree(self.backup_dir, ignore_errors=True)

    def _close(self) -> None:
        manager, self.manager = self.manager, None
        close_manager(manager)
