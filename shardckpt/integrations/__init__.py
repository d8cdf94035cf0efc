"""Bridges to the frameworks users train with; each needs an optional extra.

- ``lightning``: ``ShardCkptIO`` / ``AsyncShardCkptIO``, CheckpointIO plugins for a Lightning
  ``Trainer`` (``pip install 'shardckpt[lightning]'``).
- ``accelerate``: ``save_state`` / ``load_state`` of an ``accelerate.Accelerator`` through
  shardckpt (``pip install 'shardckpt[accelerate]'``).
- ``transformers``: ``ShardCkptTrainer`` / ``ShardCkptTrainerMixin``, a ``transformers.Trainer``
  whose checkpoints are shardckpt checkpoints (``pip install 'shardckpt[transformers]'``).
- ``tensorboard``: ``TensorBoardEvents``, an ``on_event`` callback writing SummaryWriter scalars
  (``pip install 'shardckpt[tensorboard]'``).
- ``torchtitan``: ``ShardCkptCheckpointManager``, a torchtitan checkpoint backend
  (``pip install 'shardckpt[torchtitan]'`` and ``pip install --no-deps torchtitan==0.3.0``).
- ``keras``: ``ShardCkptCheckpoint`` / ``ShardCkptBackupAndRestore``, Keras 3 callbacks on the
  torch backend (``pip install 'shardckpt[keras]'``).
- ``mlflow``, ``wandb``: ``MLflowCheckpoints`` / ``WandbCheckpoints``, ``on_event`` callbacks
  registering each committed checkpoint in the experiment tracker by reference, with aliases
  that follow retention (``pip install 'shardckpt[mlflow]'`` / ``'shardckpt[wandb]'``); the
  shared background worker is ``trackers``.

- ``dcp``: ``Reader`` / ``Writer``, torch.distributed.checkpoint storage for shardckpt folders
  (no extra needed).

The core package never imports this folder; importing a module here without its extra raises
``MissingExtraError`` with the pip command in one line.
"""

from __future__ import annotations

import importlib

from ..errors import MissingExtraError

__all__ = ["MissingExtraError", "require"]


def require(module: str, extra: str, what: str):
    """Import ``module`` or raise MissingExtraError naming ``pip install 'shardckpt[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs the {module.split('.')[0]} package: "
                                f"pip install 'shardckpt[{extra}]'") from None
