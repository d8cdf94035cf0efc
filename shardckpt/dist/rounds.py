"""Rank-robust agreement between the ranks of a save or load, outside the data collectives.

A distributed save is a few *rounds*. In each round every rank posts its result (or its error) to
the c10d key-value store that ``init_process_group`` already created; the coordinator (rank 0)
collects all of them within a deadline, decides (merges plans, commits), and posts one answer
that every rank picks up. A rank that raised posts its error; a rank that died posts nothing and
is reported when the deadline passes; a coordinator that died is reported by the others when
their deadline passes. So every rank either gets the answer or raises ``RankFailureError`` naming
each failed rank — never a hang, never one rank raising while the others wait in a collective.

The store carries JSON only (plans, chunk tables, error texts): nothing is pickled, and no NCCL or
gloo collective is issued, so a round never interleaves with the training's own collectives.

Rounds of two saves may overlap in one process (a background local save and a durable save in
the caller's thread). A c10d store client serves one request at a time, and a round's wait holds
it until its keys arrive; sharing one client, each thread's post would queue behind the other
thread's wait, which waits for that very post on another rank: a deadlock. So the main thread
uses the process's client, and every other thread a connection of its own (``Store.clone``).
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable

from .. import knobs
from ..errors import CheckpointError, RankFailureError

COORDINATOR = 0


class RemoteError(CheckpointError):
    """An exception raised on another rank, as that rank described it."""


class PerRank:
    """A decision with a part for each rank: every rank receives ``common`` with its own part
    under ``"mine"``, each part through its own store key (a rank never downloads the others')."""

    def __init__(self, common: dict, parts: dict[int, Any]):
        self.common, self.parts = common, parts


def _describe(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc)}


class Exchange:
    """One save's or load's rounds among the ranks of the default process group.

    Every rank must create its Exchanges in the same order (one per save / load), which the
    calls' collective contract already demands; each gets its own key space in the store.
    """

    _sequence = 0

    def __init__(self, timeout: float | None = None):
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        Exchange._sequence += 1
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout = float(knobs.get("dist_timeout") if timeout is None else timeout)
        self._prefix, self._shared = f"shardckpt/{Exchange._sequence}/", c10d._get_default_store()
        self._stores: dict[int, Any] = {}  # thread id -> this exchange's keys on its client
        self.round_no = 0

    @property
    def store(self):
        """This exchange's key space on the calling thread's store client (module docstring)."""
        ident = threading.get_ident()
        store = self._stores.get(ident)
        if store is None:
            import torch.distributed as dist
            store = self._stores[ident] = dist.PrefixStore(self._prefix,
                                                           thread_client(self._shared))
        return store

    def _wait(self, keys: list[str], deadline: float) -> list[str]:
        """Keys still missing at the deadline (empty when all arrived)."""
        try:
            self.store.wait(keys, timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
            return []
        except Exception:  # timeout, or the store's host (rank 0 / the agent) is gone
            try:
                return [k for k in keys if not self.store.check([k])]
            except Exception:
                return list(keys)

    def round(self, name: str, payload: Any, error: BaseException | None,
              decide: Callable[[dict[int, Any]], Any], raise_own: bool = False) -> Any:
        """Post ``payload`` (or ``error``); the coordinator runs ``decide({rank: payload})``.

        Returns the coordinator's decision on every rank. Raises RankFailureError on every rank
        when any rank posted an error, missed the deadline, or ``decide`` raised; with
        ``raise_own`` a rank that failed itself raises its own error instead.
        """
        self.round_no += 1
        prefix = f"{self.round_no}.{name}"
        post = {"error": _describe(error)} if error is not None else {"ok": payload}
        self._store("set", error, f"{prefix}/{self.rank}", json.dumps(post))
        deadline = time.monotonic() + self.timeout
        if self.rank == COORDINATOR:
            self._coordinate(prefix, decide, deadline)
        # The coordinator's deadline may start later than ours (it may post last), then it decides.
        missing = self._wait([f"{prefix}/answer"], deadline + self.timeout + 30.0)
        if missing:
            self._raise({COORDINATOR: TimeoutError(
                f"the coordinator (rank 0) gave no answer to '{name}' within "
                f"{self.timeout:.0f} s")}, error)
        answer = json.loads(self._store("get", error, f"{prefix}/answer"))
        if error is not None and raise_own:
            raise error
        if "failures" in answer:
            self._raise({int(r): RemoteError(f"{f['type']}: {f['message']}")
                         for r, f in answer["failures"].items()}, error)
        if answer.get("per_rank"):
            mine = f"{prefix}/answer/{self.rank}"
            answer["ok"]["mine"] = json.loads(self._store("get", error, mine))
            try:
                self.store.delete_key(mine)  # tidying only: the round is decided already
            except Exception:  # the store's host died since; the next request reports it
                pass
        return answer["ok"]

    def _store(self, op: str, error: BaseException | None, *args):
        """A store request; the store's host gone (rank 0's process, or the launcher's agent)
        means the coordinator is gone: a rank failure, not a stray exception."""
        try:
            return getattr(self.store, op)(*args)
        except Exception as exc:
            self._raise({COORDINATOR: ConnectionError(
                f"the c10d store is unreachable (its host died?): {type(exc).__name__}: {exc}")},
                error)

    def _coordinate(self, prefix: str, decide, deadline: float) -> None:
        keys = [f"{prefix}/{r}" for r in range(self.world)]
        missing = set(self._wait(keys, deadline))
        failures, payloads = {}, {}
        for r in range(self.world):
            if f"{prefix}/{r}" in missing:
                failures[r] = {"type": "TimeoutError", "message": f"rank {r} did not report "
                               f"within {self.timeout:.0f} s (dead or stuck)"}
                continue
            post = json.loads(self.store.get(f"{prefix}/{r}"))
            self.store.delete_key(f"{prefix}/{r}")  # read once; the store must not grow per save
            if "error" in post:
                failures[r] = post["error"]
            else:
                payloads[r] = post["ok"]
        answer = {"failures": failures}
        if not failures:
            try:
                answer = {"ok": decide(payloads)}
            except Exception as exc:  # the coordinator's own failure is a rank failure too
                answer = {"failures": {COORDINATOR: _describe(exc)}}
        if isinstance(answer.get("ok"), PerRank):
            for r, part in answer["ok"].parts.items():  # before the answer that announces them
                self.store.set(f"{prefix}/answer/{r}", json.dumps(part))
            answer = {"ok": answer["ok"].common, "per_rank": True}
        self.store.set(f"{prefix}/answer", json.dumps(answer))

    def _raise(self, failures: dict[int, BaseException], own: BaseException | None):
        if own is not None:
            failures[self.rank] = own  # the real exception object for this rank's own failure
        raise RankFailureError(failures) from own


_CLIENTS = threading.local()  # a non-main thread's own client: (the shared store, its clone)


def thread_client(shared):
    """The store client for rounds run in the calling thread: ``shared`` in the main thread, a
    clone of it (its own connection, made once per thread and store) in any other. A store that
    cannot clone (FileStore, HashStore) blocks no other client while it waits: shared then."""
    if threading.current_thread() is threading.main_thread():
        return shared
    held = getattr(_CLIENTS, "pair", None)
    if held is None or held[0] is not shared:  # first use, or a new process group since
        try:
            held = (shared, shared.clone())
        except Exception:  # no clone (RuntimeError "not implemented"): see the docstring
            held = (shared, shared)
        _CLIENTS.pair = held
    return held[1]


class LocalExchange:
    """The single-process stand-in: one rank, and ``decide`` runs in place."""

    rank, world = 0, 1

    def round(self, name: str, payload: Any, error: BaseException | None, decide,
              raise_own: bool = False) -> Any:
        if error is not None:
            raise error
        answer = decide({0: json.loads(json.dumps(payload))})
        if isinstance(answer, PerRank):
            return {**answer.common, "mine": answer.parts[0]}
        return answer


_LOCAL_ONLY = contextvars.ContextVar("shardckpt_local_only", default=False)


@contextmanager
def local_only():
    """Within this block, saves and loads of this thread involve this process alone, even where a
    process group exists (a framework that saves replicated state from rank 0 only, as
    Lightning's DDP does)."""
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def exchange(timeout: float | None = None):
    """The Exchange for this process: distributed when a process group with >1 rank exists
    (outside ``local_only``)."""
    import torch.distributed as dist
    if _LOCAL_ONLY.get():
        return LocalExchange()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Exchange(timeout)
    return LocalExchange()
