"""Hugging Face Accelerate: ``Accelerator.save_state`` / ``load_state`` content through shardckpt.

    from shardckpt.integrations.accelerate import enable
    accelerator = enable(Accelerator(project_config=ProjectConfiguration(
        project_dir="run", automatic_checkpoint_naming=True, total_limit=3)))
    accelerator.save_state()      # run/checkpoints/checkpoint_<i>, as Accelerate names them
    accelerator.load_state()      # the newest committed one

or, without touching the Accelerator's methods:

    from shardckpt.integrations.accelerate import load_state, save_state
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    accelerator.register_for_checkpointing(my_stateful_thing)
    save_state(accelerator, "ckpt/step-100")      # every process calls it (collective)
    load_state(accelerator, "ckpt/step-100")      # on 1 or N processes

What Accelerate's own ``save_state`` writes as pickles and ``torch.save`` files becomes one
atomic, checksummed shardckpt checkpoint loaded without unpickling: the prepared models
(unwrapped), optimizers, schedulers, the gradient scaler, the objects registered with
``register_for_checkpointing``, each process's RNG states (python, numpy, torch, CUDA), the
data loaders' positions (epoch counter, seedable sampler, a stateful loader's state) and
``accelerator.step``. Replicated weights are written once; per-process values (RNG) are kept per
process. ``state_of(accelerator)`` gives the same state for ``CheckpointManager``. Needs
``pip install 'shardckpt[accelerate]'``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import types

import numpy as np
import torch

from . import require

require("accelerate", "accelerate", "shardckpt.integrations.accelerate")

from .. import api  # noqa: E402
from ..errors import CheckpointExistsError, CheckpointNotFoundError  # noqa: E402
from ..format.retire import remove_checkpoint  # noqa: E402
from ..storage import open_checkpoint  # noqa: E402

__all__ = ["enable", "save_state", "load_state", "state_of"]


class _RNG:
    """This process's random generators as a state dict of tensors and ints."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                           "pos": int(pos), "has_gauss": int(has_gauss),
                           "gauss": float(gauss)}}
        if torch.cuda.is_available():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["gauss"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["cuda"]))


class _Loader:
    """A prepared data loader's position: epoch counter, seedable sampler, stateful state."""

    def __init__(self, loader):
        self.loader = loader

    def _sampler(self):
        get = getattr(self.loader, "get_sampler", None)
        sampler = get() if get else None
        return sampler if hasattr(sampler, "initial_seed") else None

    def state_dict(self) -> dict:
        state = {"iteration": int(getattr(self.loader, "iteration", 0))}
        sampler = self._sampler()
        if sampler is not None:
            state["sampler"] = {"epoch": int(sampler.epoch),
                                "initial_seed": int(sampler.initial_seed)}
        if getattr(self.loader, "use_stateful_dataloader", False):
            state["loader"] = self.loader.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.loader, "iteration"):
            self.loader.iteration = state["iteration"]
        sampler = self._sampler()
        if sampler is not None and "sampler" in state:
            sampler.epoch = state["sampler"]["epoch"]
            sampler.initial_seed = state["sampler"]["initial_seed"]
        if "loader" in state:
            self.loader.load_state_dict(state["loader"])


class _Custom:
    """An object registered with ``register_for_checkpointing``. Its state may change shape
    between save and load (a history that grows), so on load the saved state replaces a
    placeholder whole instead of being matched against the object's current state."""

    def __init__(self, obj, loading: bool):
        self.obj, self.loading = obj, loading

    def state_dict(self) -> dict:
        return {"state": None if self.loading else self.obj.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.obj.load_state_dict(state["state"])


class _Step:
    """``accelerator.step`` (the gradient-accumulation step counter)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def state_dict(self) -> dict:
        return {"step": int(self.accelerator.step)}

    def load_state_dict(self, state: dict) -> None:
        self.accelerator.step = state["step"]


def state_of(accelerator, loading: bool = False) -> dict:
    """The state ``save_state`` writes, as live objects (for ``shardckpt.save`` / ``load`` and
    ``CheckpointManager``; pass ``loading=True`` for ``load`` / ``restore``); its keys: models,
    optimizers, schedulers, scaler (when used), custom, dataloaders, rng, step."""
    state = {"models": [accelerator.unwrap_model(m) for m in accelerator._models],
             "optimizers": list(accelerator._optimizers),
             "schedulers": list(accelerator._schedulers),
             "custom": [_Custom(o, loading) for o in accelerator._custom_objects],
             "dataloaders": [_Loader(d) for d in accelerator._dataloaders],
             "rng": _RNG(), "step": _Step(accelerator)}
    if getattr(accelerator, "scaler", None) is not None:
        state["scaler"] = accelerator.scaler
    return state


def save_state(accelerator, path, **save_options) -> api.SaveInfo:
    """Save what ``accelerator.save_state`` would, as a shardckpt checkpoint at ``path``.

    Every process calls it (collective when several exist). ``save_options`` go to
    ``shardckpt.save`` (``codec``, ``overwrite``, ``metadata``...).
    """
    return api.save(state_of(accelerator), path, **save_options)


def load_state(accelerator, path, **load_options) -> None:
    """Load a checkpoint written by ``save_state`` into the prepared objects, in place.

    Every process calls it. On another number of processes than saved, pass
    ``per_rank="rank0"`` (or ``"modulo"``) for the per-process RNG states.
    """
    api.load(state_of(accelerator, loading=True), path, **load_options)


# ---- accelerator.save_state() / load_state() themselves (the one-line switch) ----

_NUMBERED = re.compile(r"checkpoint_(\d+)")
_MAP_LOCATIONS = (None, "cpu", "on_device")


def enable(accelerator):
    """Make ``accelerator.save_state()`` / ``load_state()`` write and read shardckpt checkpoints.

    One line after building the ``Accelerator``; the training loop keeps calling
    ``accelerator.save_state()`` as before. Accelerate's contract is kept: with
    ``ProjectConfiguration(automatic_checkpoint_naming=True)`` a call without a path saves to
    ``project_dir/checkpoints/checkpoint_<iteration>``, refuses one that exists, deletes the
    oldest numbered checkpoints beyond ``total_limit`` and advances ``iteration``;
    ``load_state()`` without a path loads the highest-numbered committed checkpoint there. A
    given ``output_dir`` is replaced if it holds a checkpoint. Registered model save / load
    pre-hooks are called with Accelerate's arguments (save hooks after the commit, with the
    committed folder, so that their own files land in a complete checkpoint).

    Args:
        accelerator: an ``accelerate.Accelerator``.

    Returns:
        the same accelerator (its ``save_state`` / ``load_state`` replaced on this instance).
    """
    accelerator.save_state = types.MethodType(_save_state_method, accelerator)
    accelerator.load_state = types.MethodType(_load_state_method, accelerator)
    return accelerator


def _checkpoints_dir(accelerator) -> str:
    return os.path.join(accelerator.project_dir, "checkpoints")


def _numbered(root: str) -> list[tuple[int, str]]:
    """``(number, name)`` of the ``checkpoint_<n>`` entries under ``root``, oldest first."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        match = _NUMBERED.fullmatch(name)
        if match:
            found.append((int(match.group(1)), name))
    return sorted(found)


def _make_room(accelerator, root: str) -> None:
    """Delete the oldest numbered checkpoints so that one more fits ``total_limit``."""
    limit = accelerator.project_configuration.total_limit
    existing = _numbered(root)
    if limit is None or not accelerator.is_main_process or len(existing) + 1 <= limit:
        return
    for _, name in existing[:len(existing) + 1 - limit]:
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "manifest.json")):
            storage, checkpoint = open_checkpoint(path)
            remove_checkpoint(storage, checkpoint)
        else:  # Accelerate's own format from before the switch: deleted as Accelerate does
            shutil.rmtree(path)


def _automatic_path(accelerator) -> str:
    root = _checkpoints_dir(accelerator)
    os.makedirs(root, exist_ok=True)
    _make_room(accelerator, root)
    path = os.path.join(root, f"checkpoint_{accelerator.save_iteration}")
    if os.path.exists(path):
        raise CheckpointExistsError(
            f"Checkpoint directory {path} ({accelerator.save_iteration}) already exists. "
            "Please manually override `self.save_iteration` with what iteration to start with.")
    accelerator.wait_for_everyone()
    return path


def _save_state_method(self, output_dir=None, safe_serialization: bool = True,
                       **save_model_func_kwargs) -> str:
    """``Accelerator.save_state`` through shardckpt (see ``enable``); returns the folder."""
    if self.project_configuration.automatic_checkpoint_naming:
        path, overwrite = _automatic_path(self), False
    elif output_dir is None:
        raise ValueError("save_state() needs an output_dir unless the ProjectConfiguration "
                         "has automatic_checkpoint_naming=True")
    else:
        path, overwrite = os.path.expanduser(os.fspath(output_dir)), True
    api.save(state_of(self), path, overwrite=overwrite)
    weights = [self.get_state_dict(m, unwrap=False) for m in self._models] \
        if self._save_model_state_pre_hook else []
    for hook in self._save_model_state_pre_hook.values():
        hook(self._models, weights, path)
    self.project_configuration.iteration += 1
    return path


def _latest(accelerator) -> str:
    root = _checkpoints_dir(accelerator)
    committed = [name for _, name in _numbered(root)
                 if os.path.isfile(os.path.join(root, name, "manifest.json"))]
    if not committed:
        raise CheckpointNotFoundError(f"{root}: no committed checkpoint_<n> to load")
    return os.path.join(root, committed[-1])


def _load_state_method(self, input_dir=None, **load_model_func_kwargs) -> None:
    """``Accelerator.load_state`` through shardckpt (see ``enable``)."""
    map_location = load_model_func_kwargs.pop("map_location", None)
    if map_location not in _MAP_LOCATIONS:
        raise TypeError(f"Unsupported optimizer map location passed, please choose one of "
                        f"None, 'cpu', or 'on_device'. Got {map_location!r}")
    if input_dir is not None:
        path = os.path.expanduser(os.fspath(input_dir))
    elif self.project_configuration.automatic_checkpoint_naming:
        path = _latest(self)
    else:
        raise ValueError("No input_dir provided and automatic checkpoint naming is disabled.")
    models = list(self._models)
    for hook in self._load_model_state_pre_hook.values():
        hook(models, path)
    api.load(state_of(self, loading=True), path)
