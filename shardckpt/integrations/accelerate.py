"""Hugging Face Accelerate: ``Accelerator.save_state`` / ``load_state`` content through shardckpt.

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

import random

import numpy as np
import torch

from . import require

require("accelerate", "accelerate", "shardckpt.integrations.accelerate")

from .. import api  # noqa: E402

__all__ = ["save_state", "load_state", "state_of"]


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
