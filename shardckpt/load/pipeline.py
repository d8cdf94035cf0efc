"""Load's pipeline: open the manifest (alone or shared by node), match the target state, plan
the reads, fetch and decode into place, then let the ranks agree on the outcome."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch

from . import share
from ..dist.rounds import exchange
from ..errors import StateMismatchError
from ..format.opening import open_for_read
from ..format.tree import build, dict_items, node_kind, path_text, with_overrides
from ..observe import log_load
from ..types import Manifest
from .place import match
from .read import ReadPlan, read_blob


def load(state: Any, path, *, strict: bool = True, per_rank: str = "error",
         threads: int | None = None, timeout: float | None = None,
         storage_options: dict | None = None) -> Any:
    """``shardckpt.load`` (api.py documents it): every rank prepares its reads, then the ranks
    agree on who reads the shared chunks, fill their state, and agree on the outcome."""
    t0 = time.perf_counter()
    run = LoadRun(exchange(timeout), path, storage_options)
    run.prepare(state, strict, per_rank)
    run.agree_and_fill(threads)
    log_load(str(path), run.plan, time.perf_counter() - t0)
    return run.result


class LoadRun:
    """One load on one rank. ``prepare`` keeps its error instead of raising, so that every rank
    still meets the others in the rounds of ``agree_and_fill``, which raises on all of them."""

    def __init__(self, ex, path, storage_options: dict | None):
        self.ex, self.path, self.storage_options = ex, path, storage_options
        self.sharing = share.enabled(ex.world, path)  # every rank decides alike
        self.error = self.result = self.placement = self.plan = self.paths = None
        self.session = None

    def prepare(self, state, strict: bool, per_rank: str) -> None:
        """Open the manifest (shared by node when sharing), match ``state`` against it and plan
        the reads; an error is kept in ``self.error``."""
        ex = self.ex
        try:
            if self.sharing:
                self.session = share.Session(ex.rank, ex.world, ex.timeout)
            m, self.paths = (self.session.open_manifest(self.path, self.storage_options)
                             if self.sharing else open_for_read(self.path, self.storage_options))
            self.result, self.placement = match(
                state, m, tree_for(m, ex.rank, ex.world, per_rank), strict,
                blob=partial(read_blob, m, self.paths))
            p = self.placement
            if p.missing or p.unexpected or p.mismatched:
                raise StateMismatchError(p.missing, p.unexpected, p.mismatched)
            self.plan = _read_plan(m, p)
        except Exception as exc:
            self.error = exc

    def agree_and_fill(self, threads: int | None) -> None:
        """The "needs" round (shared loads), the fill, and the "load" round where every rank
        learns whether all succeeded; raises on every rank when any failed."""
        ex, error, session = self.ex, self.error, self.session
        try:
            if self.sharing:  # every rank learns who reads which shared chunk, or raises
                decision = ex.round("needs", None if error else share.needs(self.plan), error,
                                    session.assign if session else None, raise_own=True)
            if error is None:
                error = _fill(self.plan, self.placement, self.paths, threads,
                              (session, share.SharedPlan(decision, ex.rank))
                              if self.sharing else None)
            # A rank whose collective broke reports it; the round names the rank gone silent.
            ex.round("load", True, error, lambda _: True,
                     raise_own=not isinstance(error, share.ShareLostError))
        except Exception:
            if self.sharing:
                share.forget()  # every rank raised in the same round: all drop the gloo group
                if session is not None:
                    session.close(failed=True)
            raise
        if session is not None:
            session.close()  # after the last round: no local rank still maps the node's files


def _fill(plan: ReadPlan, placement, paths, threads, shared) -> Exception | None:
    """Fetch, decode and place every planned chunk (the shared ones first, when ``shared`` is
    ``(share.Session, SharedPlan)``); the error that stopped it, or None."""
    try:
        if shared:
            session, decision = shared
            session.fetch(plan, decision, paths, threads)
        plan.run(paths, threads)
        placement.apply()
    except Exception as exc:
        return exc
    return None


def _read_plan(m: Manifest, placement) -> ReadPlan:
    """The chunk reads that fill every target of ``placement``."""
    plan, planned = ReadPlan(m), set()
    for key, target in placement.fills:
        ident = (key, target.device, target.data_ptr(), target.stride())
        if ident not in planned:  # tied weights: the same memory is filled once
            planned.add(ident)
            plan.into(key, target)
    for key, fresh in placement.new.items():
        plan.into(key, fresh)
    return plan


def tree_for(m: Manifest, rank: int, world: int, per_rank: str):
    """The saved tree this rank loads (FORMAT.md 3.5), by the ``per_rank`` rule."""
    if per_rank not in ("error", "rank0", "modulo"):
        raise ValueError(f"per_rank must be 'error', 'rank0' or 'modulo', not {per_rank!r}")
    if not m.rank_overrides:
        return m.tree
    if world != m.world_size and per_rank == "error":
        why = (f"differs between the {m.world_size} saving ranks and this load runs on {world};"
               " pass per_rank='rank0' or per_rank='modulo', or leave it out of the state")
        paths = dict.fromkeys(path_text(path) for _, own in m.rank_overrides for path, _ in own)
        raise StateMismatchError(mismatched=[(p, why) for p in paths])
    source = rank if world == m.world_size else 0 if per_rank == "rank0" else \
        rank % m.world_size
    return saved_tree(m, source)


def saved_tree(m: Manifest, rank: int):
    """Saving rank ``rank``'s tree: the manifest's tree with that rank's overrides."""
    if not 0 <= rank < m.world_size:
        raise ValueError(f"rank {rank} is not among the {m.world_size} saving ranks")
    own = dict(m.rank_overrides or ()).get(rank, [])
    return with_overrides(m.tree, own)


def load_full(path, *, key: str | None = None, rank: int = 0, threads: int | None = None,
              storage_options: dict | None = None) -> Any:
    """``shardckpt.load_full`` (api.py documents it): the saved tree of ``rank``, or its
    ``key`` subtree, built on the CPU with every tensor whole."""
    t0 = time.perf_counter()
    m, paths = open_for_read(path, storage_options)
    node = subtree(saved_tree(m, rank), key)
    plan, made = ReadPlan(m), {}

    def tensor(k):
        if k not in made:
            entry = m.tensors[k]
            made[k] = t = torch.empty(entry.shape, dtype=entry.dtype.torch)
            plan.into(k, t)
        return made[k]

    state = build(node, tensor, blob=partial(read_blob, m, paths))
    plan.run(paths, threads)
    log_load(str(path), plan, time.perf_counter() - t0)
    return state


def subtree(node, key: str | None):
    """The node at ``key`` (``/``-separated dict keys) of a saved tree; the root without one."""
    for part in key.split("/") if key else ():
        kind, payload = node_kind(node)
        children = dict(dict_items(payload)) if kind == "dict" else {}
        if part not in children:
            raise StateMismatchError(missing=[key])
        node = children[part]
    return node
