"""A rank's random generators as one stateful object with a rule for a new world size: restored
exactly on the saving world size, reseeded from (seed, step, new rank) on another."""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable

import torch
import torch.distributed as dist


def seed_for(seed: int, step: int, rank: int) -> int:
    """The seed rank ``rank`` draws from after resuming at ``step`` on a new world size.

    A 63-bit BLAKE2b digest of the three numbers: deterministic, different for every rank and
    every step, and independent of the world sizes before and after.

    Args:
        seed: the run's seed.
        step: the global step (or any counter every rank agrees on) the checkpoint was saved at.
        rank: the new rank.

    Returns:
        a non-negative int below 2**63.
    """
    digest = hashlib.blake2b(f"shardckpt-rng:{seed}:{step}:{rank}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class RankRNG:
    """This rank's torch (CPU and CUDA), ``random`` and NumPy generators as one stateful object.

    Put it in the checkpointed state. On the world size it was saved with, each rank gets its
    own generators back bit for bit. On another world size the old ranks' streams have no
    meaning for the new ranks, so every generator of rank ``r`` is reseeded with
    ``seed_for(seed, step, r)``, where ``step`` is the saving step: two resumes of the same
    checkpoint on the same world size draw the same numbers, and no two ranks share a stream.
    Loading a per-rank value on another world size needs ``per_rank="rank0"`` (or
    ``"modulo"``) in ``load`` / the manager's ``load_options``; any saved rank's state carries
    the step and the saving world size this rule reads.

    Args:
        seed: the run's seed.
        step: returns the global step (the same on every rank) when a checkpoint is taken, for
            example ``lambda: state["step"]``.
        world: returns (rank, world size); default: the process group's, else (0, 1).
    """

    def __init__(self, seed: int, step: Callable[[], int],
                 world: Callable[[], tuple[int, int]] | None = None):
        self.seed = seed
        self._step = step
        self._world = world or _group
        self.reseeded: int | None = None  # the seed of the last reseed (None: restored/untouched)

    def state_dict(self) -> dict[str, Any]:
        """This rank's generator states, the step and the world they belong to.

        Returns:
            ``seed``, ``step``, ``rank``, ``world``, ``torch``, ``python`` and, where present,
            ``cuda`` and ``numpy``.
        """
        rank, world = self._world()
        state = {"seed": self.seed, "step": int(self._step()),
                 "rank": rank, "world": world, "torch": torch.get_rng_state(),
                 "python": _python_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        numpy = _numpy_state()
        if numpy is not None:
            state["numpy"] = numpy
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's generators, or reseed them by the new-world rule.

        Args:
            state: a saved :meth:`state_dict` (this rank's, or any rank's on a new world size).
        """
        rank, world = self._world()
        if state["world"] == world and state["rank"] == rank:
            self._restore(state)
            self.reseeded = None
            return
        self.reseeded = seed_for(int(state["seed"]), int(state["step"]), rank)
        _reseed(self.reseeded)

    def _restore(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        version, words, gauss = state["python"]["version"], state["python"]["words"], \
            state["python"]["gauss"]
        random.setstate((version, tuple(words.tolist()), gauss))
        if "numpy" in state:
            import numpy
            s = state["numpy"]
            numpy.random.set_state((s["kind"], s["keys"].numpy().astype(numpy.uint32), s["pos"],
                                    s["has_gauss"], s["gauss"]))


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)  # the CPU generator and every CUDA device's
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)  # numpy's legacy seeds are 32-bit


def _group() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _python_state() -> dict[str, Any]:
    version, words, gauss = random.getstate()
    return {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss}


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy
    except ImportError:
        return None
    kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}
