"""The local tier: frequent checkpoints in node-local storage, each rank's data replicated on
other nodes, restored from the fastest complete copy (FORMAT.md 6).

A local checkpoint is an ordinary checkpoint folder ``<local_dir>/step-<n>`` on every node: the
same manifest (the whole checkpoint's) and the data files of the node's own ranks plus the
replicas it holds for ranks of ``replicas`` other nodes. ``{node}`` in ``local_dir`` is replaced
by the node index (torchrun's ``GROUP_RANK``, else ``RANK // LOCAL_WORLD_SIZE``).

Save (``LocalTier.save_async``, what the manager calls): the plan round of the ordinary save
and a copy of this rank's state into the tier's own staging arena (stage.py, within the staging
budget) run in the caller's thread; then a background thread encodes and writes the rank's files
into the agreed hidden temporary folder on its node (the native writer, fsync'ed) and sends them
to rank ``(r + k * L) % W`` for ``k`` in ``1..replicas`` (L ranks per node) while receiving the
ones of ``(r - k * L) % W``, over a gloo group of the tier's own (dist/transfer.py). Only when
every rank reports its files and replicas durable does rank 0 build the manifest; each node's
first rank then checks every replica its node received against it (check.py: a peer that
sent wrong bytes fails the save), and only when every node's check passed writes it into its
folder and renames the folder into place (the same atomic commit as the durable tier). Any
failure, a peer's death included, fails the save on every rank and commits nothing; it is a
warning at the next call. A local step whose previous save still runs is skipped on every rank
(they agree on a second small group), or waited for. A committed background save leaves a record
(``completions``: its step, stall and seconds until committed on every node, replicas included)
that the manager feeds to the local tier's save rule, as it does with a durable save's costs.

Each local manifest records the job it belongs to (the durable root and the job id stored
there, check.py); a restore ignores every copy recorded with another job or none.

Restore (``LocalTier.restore``, restore.py): the ranks agree on the candidate steps (from
every node's committed local checkpoints of this job), and for each, newest first, every
node's first rank looks at its copy (manifest, which files are present with their size).
Files a node lacks are fetched from a node holding a copy; then every rank loads from its own
node's folder (resharding as any load does), the load checking every checksum once. A file it
finds corrupt is fetched again from a replica and the load repeated.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
import warnings

import torch

from ... import knobs
from ...format import manifest as manifest_mod
from ...format.root import DELETE_MARK, is_committed, remove_leftovers
from ...save import (RenameCommit, Stager, StagingArena, Worker, WriteOptions, build_manifest,
                     default_budget, plan_chunks, plan_save, split_budget, write_rank)
from ...dist.groups import gloo_group
from ...dist.rounds import PerRank, exchange
from ...dist.topology import this_node
from ...errors import CheckpointError, TransferError
from ..layout import STEP_NAME, step_name
from ...format.opening import checked_manifest
from ...storage import LocalStorage
from .promote import promote as promote_step
from .check import JOB_KEY, check_files, job_identity, recorded_job
from .restore import restore_newest
from ...dist.transfer import exchange_files
from ...types import DATA_DIR

__all__ = ["LocalTier", "local_path_for"]

_RECEIPT = re.compile(r"\..+\.recv-[0-9a-f]+")  # a file being received (dist/transfer.py)
# Background local saves, one at a time per process (each tier's own thread would do no better:
# a tier's saves are serial anyway). Lowered priority, as async_save's writer.
_WORKER = Worker("shardckpt-local-save", "sc-local", background=True)


def local_path_for(local_dir, node: int) -> str:
    """``local_dir`` with ``{node}`` replaced by ``node``."""
    return os.path.abspath(str(local_dir).replace("{node}", str(node)))


def _or_warn(action, what: str) -> bool:
    """Run ``action``; a CheckpointError becomes a warning ``what: error``. Whether it ran."""
    try:
        action()
        return True
    except CheckpointError as exc:
        warnings.warn(f"shardckpt: {what}: {type(exc).__name__}: {exc}", stacklevel=4)
        return False


class LocalTier:
    """One manager's local tier (see the module docstring). Construct it on every rank.

    ``durable``: the storage of the job's durable root, whose identity every local checkpoint
    records (check.py); None: the tier records none and restores only copies without one.
    ``clock``: the clock (seconds) that times the saves for ``completions`` (the manager's).
    """

    def __init__(self, local_dir, *, replicas: int = 1, keep: int = 1,
                 save_options: dict | None = None, staging_budget_bytes: int | None = None,
                 on_busy: str = "skip", durable=None, clock=time.monotonic):
        import torch.distributed as dist
        if not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be an int >= 0, not {replicas!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"local_keep must be a positive int, not {keep!r}")
        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1
        self.node = this_node() if self.dist else 0
        self.nodes_of = self._gather_nodes()
        self.per_node = self.nodes_of.count(self.node)
        n_nodes = len(set(self.nodes_of))
        if replicas >= n_nodes:  # e.g. a restart on fewer nodes: keep going with fewer
            if replicas and self.world > 1:
                warnings.warn(f"shardckpt: replicas={replicas} needs more than {n_nodes} "
                              f"node(s) (a replica never sits on its original's node); the "
                              f"local tier keeps {n_nodes - 1}", stacklevel=3)
            replicas = n_nodes - 1
        if replicas and any(self.nodes_of.count(n) != self.per_node for n in self.nodes_of):
            raise ValueError("replicas need the same number of ranks on every node")
        if on_busy not in ("skip", "wait"):
            raise ValueError(f"local_on_busy must be 'skip' or 'wait', not {on_busy!r}")
        self.replicas, self.keep, self.on_busy = replicas, keep, on_busy
        self.dir = local_path_for(local_dir, self.node)
        os.makedirs(self.dir, exist_ok=True)
        self.storage = LocalStorage(self.dir)
        self.leader = self.rank == min(r for r, n in enumerate(self.nodes_of) if n == self.node)
        self.save_options = dict(save_options or {})
        self.last_committed: int | None = None  # the step of the last local save, if it committed
        self.committed_at = 0.0  # the clock when it committed
        self.staging_budget = staging_budget_bytes  # None: default_budget()
        self.arena = StagingArena()  # its own: a durable async save may be staging too
        self._job, self._job_step = None, None  # the background save in flight (a Future)
        self.skipped = self.failed = 0  # local saves skipped (one in flight) / failed
        # Rank 0 reads (or makes) the durable root's job id; every rank gets the same answer.
        self.job = None if durable is None else exchange(None).round(
            "local-job", True, None, lambda _: job_identity(durable))
        self._owned: dict[int, bool] = {}  # step -> recorded with this job (leaders' cache)
        self.clock = clock
        self._done: list[dict] = []  # records of committed background saves, not yet taken
        self._done_lock = threading.Lock()  # the background thread appends, the caller takes

    # ------------------------------------------------------------------ group
    def _gather_nodes(self) -> list[int]:
        self.group = self.ctl = None
        if not self.dist or self.world == 1:
            return [0]
        timeout = float(knobs.get("dist_timeout"))
        # Two groups of the tier's own, made once: ``group`` carries the replicas (in the
        # background thread), ``ctl`` the caller's small agreements while one may be running;
        # neither is ever used by the training's collectives or a durable save.
        self.group = gloo_group(timeout)
        self.ctl = gloo_group(timeout)
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self.dist.all_gather(out, torch.tensor([this_node()], dtype=torch.int64),
                             group=self.group)
        return [int(t) for t in out]

    def _ring(self, k: int) -> tuple[int, int]:
        """(the rank this rank's k-th replica goes to, the rank whose k-th it receives)."""
        shift = k * self.per_node
        return (self.rank + shift) % self.world, (self.rank - shift) % self.world

    def path(self, step: int) -> str:
        """This node's folder for ``step``."""
        return os.path.join(self.dir, step_name(step))

    def steps(self) -> list[int]:
        """Steps committed in this node's local dir, ascending (this job's or not)."""
        found = sorted(int(m.group(1)) for n in self.storage.list("")
                       if (m := STEP_NAME.fullmatch(n)))
        return [s for s in found if is_committed(self.storage, step_name(s))]

    def own_steps(self) -> list[int]:
        """Committed steps of this node's local dir recorded with this tier's job, ascending."""
        return [s for s in self.steps() if self.owns(s)]

    def owns(self, step: int) -> bool:
        """Whether this node's committed ``step`` was recorded with this tier's job."""
        if step not in self._owned:
            self._owned[step] = recorded_job(self.storage, step_name(step)) == self.job
        return self._owned[step]

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, metadata: dict) -> None:
        """Save ``state`` as local step ``step`` on every node, with its replicas (collective,
        synchronous; waits for a background save in flight first).

        Raises DiskFullError / StorageError / TransferError here, RankFailureError on the
        other ranks; then nothing was committed and older local checkpoints are untouched.
        """
        self.wait()
        planned, name = self._plan(step, state, metadata)
        sources, hosts = plan_chunks(planned.pieces(), planned.opts.chunk_bytes)
        self._complete(step, name, planned, [(sources, hosts.clear)])

    def save_async(self, step: int, state, metadata: dict) -> bool:
        """Start local step ``step`` and return once this rank's state is copied into the
        tier's own staging arena (collective). Encoding, writing, the replica transfer and the
        commit run in a background thread. Whether a save started.

        A save still in flight on any rank makes every rank skip this one (counted in
        ``skipped``, with a warning): with saves every step the tier then saves as often as
        its writes allow, and the training never waits for them. With ``on_busy="wait"``
        every rank waits for it instead (every step then gets its local checkpoint). The previous save's failure
        is a warning here (``failed`` counts them); the training and the durable tier go on.
        """
        if self.on_busy == "wait":
            self.wait()  # not the new save's cost: Auto's model counts it as the lag (interval.py)
        started = self.clock()
        self._collect()
        try:
            busy = self._any(self._job is not None and not self._job.done())
        except TransferError as exc:  # a rank is gone: this local save cannot take place
            self._fail(step, exc)
            return False
        if busy:
            self.skipped += 1
            warnings.warn(f"shardckpt: local step {step} skipped: the local save of step "
                          f"{self._job_step} is still running ({self.skipped} skipped so far)",
                          stacklevel=3)
            return False
        self._collect()  # done since the check, on this rank
        try:
            planned, name = self._plan(step, state, metadata)
        except CheckpointError as exc:
            self._fail(step, exc)
            return False
        budget = self.staging_budget or default_budget()
        arena_bytes, planned.opts = split_budget(budget, planned.opts)
        try:
            stager = Stager(planned.pieces(), arena_bytes, planned.opts.chunk_bytes,
                                  arena=self.arena)
        except BaseException:
            planned.close()
            raise
        self._job_step = step
        record = {"step": step, "stall_s": 0.0, "seconds": None, "started": started}
        self._job = _WORKER.submit(self._background, step, name, planned, stager, record)
        stager.run()  # a state larger than the arena streams: this then waits for the writes
        # Set before the caller's next call, the only place ``completions`` hands it out.
        record["stall_s"] = self.clock() - started
        return True

    def _background(self, step: int, name: str, planned, stager, record: dict) -> None:
        try:
            self._complete(step, name, planned, stager.batches())
        finally:
            stager.abort()
            stager.release()
        record["seconds"] = self.committed_at - record.pop("started")
        with self._done_lock:
            self._done.append(record)

    def completions(self) -> list[dict]:
        """The background saves that committed since the last call, oldest first.

        Returns:
            one record per save, the shape of a durable save's history timings: ``step``,
            ``stall_s`` (seconds ``save_async`` blocked the caller) and ``seconds`` (from the
            call until the checkpoint was committed on every node, replicas included).
        """
        with self._done_lock:
            done, self._done = self._done, []
        return done

    def wait(self) -> bool | None:
        """Wait for the background save in flight; whether it committed (None: none ran).
        A failure is a warning, never raised."""
        if self._job is None:
            return None
        self._job.exception()  # waits; _collect reads it
        return self._collect()

    def _collect(self) -> bool | None:
        """Retire a finished background save: warn about its failure."""
        job, step = self._job, self._job_step
        if job is None or not job.done():
            return None
        self._job = None
        exc = job.exception()
        if exc is not None:
            self._fail(step, exc)
        return exc is None

    def _fail(self, step: int, exc: BaseException) -> None:
        self.failed += 1
        warnings.warn(f"shardckpt: local save of step {step} to {self.dir} failed, nothing "
                      f"committed: {type(exc).__name__}: {exc}", stacklevel=4)

    def _any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (on the control group: the data group may be
        busy in the background)."""
        if self.ctl is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        try:
            self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX, group=self.ctl)
        except RuntimeError as exc:  # gloo's word for a dead or hung peer
            raise TransferError(f"rank {self.rank}: the local tier's busy round failed: "
                                f"{exc}") from exc
        return bool(int(t))

    def save_or_warn(self, step: int, state, metadata: dict) -> bool:
        """``save``, with a failure turned into a warning (the training and the durable tier go
        on; the previous local checkpoint stays usable). Whether it committed."""
        return _or_warn(lambda: self.save(step, state, metadata),
                        f"local save of step {step} to {self.dir} failed, nothing committed")

    def _plan(self, step: int, state, metadata: dict):
        """The plan round of local step ``step`` (collective, caller's thread: the store
        rounds are numbered in call order)."""
        opts = WriteOptions.resolve(**{k: v for k, v in self.save_options.items()
                                       if k in WriteOptions.__dataclass_fields__})
        name = step_name(step)
        if self.leader:  # a save replaces the folder: none of its files may look foreign
            self.sweep_receipts(name)
        if self.job is not None:
            metadata = {**metadata, JOB_KEY: self.job}
        planned = plan_save(state, self.storage, name, opts, metadata, True, None,
                            indexed=False)  # the tier builds an inline manifest
        return planned, name

    def _complete(self, step: int, name: str, planned, batches) -> None:
        """Write, replicate and commit a planned local save (collective on the tier's group)."""
        tmp = planned.tmp
        try:
            report, error = None, None
            try:
                report = self._write_and_replicate(planned, tmp, batches)
            except Exception as exc:
                error = exc
            coord = planned.coord
            answer = planned.ex.round(
                "local-write", report, error,
                coord and (lambda results: self._manifest(coord, results)))
            manifest, error = answer["mine"].encode(), None
            try:
                if self.leader:
                    self._check_replicas(tmp, manifest)
            except Exception as exc:
                error = exc
            planned.ex.round("local-check", True, error, lambda _: True)  # before any commit
            error = None
            try:
                if self.leader:
                    self._commit(name, tmp, manifest)
            except Exception as exc:
                error = exc
            planned.ex.round("local-commit", True, error, lambda _: True)
            self.committed_at = self.clock()  # every node committed; retention is not the save's
            self.last_committed = step
            self._owned[step] = True
        finally:
            self.storage.delete(tmp)  # gone after a commit; a failed save's debris otherwise
            planned.close()
        if self.leader:
            self._retain(step)

    def _write_and_replicate(self, planned, tmp: str, batches) -> dict:
        opts = planned.opts
        self.storage.makedirs(f"{tmp}/{DATA_DIR}")  # rank 0 made node 0's; the others theirs
        report, failed = {"files": []}, None
        try:
            keys = [str(int(i)) for i in planned.assigned]
            report = write_rank(self.storage, tmp, self.rank, keys, batches, opts)
            report.pop("stats", None)
        except CheckpointError as exc:
            failed = exc  # still take part in the transfers: no peer waits on us in vain
        folder = self.storage.local_path(tmp)
        for k in range(1, self.replicas + 1):
            dst, src = self._ring(k)
            exchange_files(self.dist, self.group, folder, [f["path"] for f in report["files"]],
                           dst, src, what=f"local step replica {k}")
        if failed is not None:
            raise failed
        return report

    def _check_replicas(self, tmp: str, manifest: bytes) -> None:
        """A node's first rank: every file this node received from other nodes' ranks has the
        bytes the manifest (the senders' own reports) says (check.py)."""
        held = self._replica_ranks()
        if not held:
            return
        m = checked_manifest(self.storage, tmp, manifest)
        check_files(self.storage, tmp, m, [i for i, f in enumerate(m.files) if f.rank in held])

    def _replica_ranks(self) -> set[int]:
        """The ranks whose files this node receives as replicas (``_ring``)."""
        here = [r for r, n in enumerate(self.nodes_of) if n == self.node]
        return {(r - k * self.per_node) % self.world for r in here
                for k in range(1, self.replicas + 1)}

    def _manifest(self, coord, results: dict) -> PerRank:
        """Rank 0: the manifest, sent to each node's first rank only (they commit)."""
        m = build_manifest(coord.gp, coord.plans, results, coord.metadata)
        manifest_mod.check_complete(m, coord.storage.url(coord.name))
        text = manifest_mod.to_json(m).decode()
        firsts = {self.nodes_of.index(n) for n in set(self.nodes_of)}
        return PerRank({}, {r: text if r in firsts else "" for r in range(self.world)})

    def _commit(self, name: str, tmp: str, manifest: bytes) -> None:
        tx = RenameCommit(self.storage, name, overwrite=True)
        tx.tmp = tmp
        try:
            tx.commit(manifest)
        finally:
            if tx.tmp != tmp:  # an exchange left the replaced checkpoint there
                tx.close()

    def _retain(self, newest: int) -> None:
        """Keep the ``keep`` newest committed local steps of this job on this node; remove the
        others, another job's included (never restored here: debris in this tier's folder)."""
        others = [s for s in self.steps() if s != newest]
        kept = set([s for s in others if self.owns(s)][-(self.keep - 1):] if self.keep > 1
                   else [])
        for s in others:
            if s not in kept:
                self._remove(step_name(s))
                self._owned.pop(s, None)
        remove_leftovers(self.storage)

    def sweep_receipts(self, name: str) -> list[str]:
        """Delete the partly received files (``data/.<file>.recv-<hex>``, FORMAT.md 4.4) that a
        transfer killed mid-way left in this node's committed folder ``name``; what went. Only
        while no transfer writes there (a restore's repair runs with no save in flight)."""
        data = f"{name}/{DATA_DIR}"
        gone = [n for n in self.storage.list(data) if _RECEIPT.fullmatch(n)]
        for n in gone:
            self.storage.delete(f"{data}/{n}")
        return gone

    def _remove(self, name: str) -> None:
        hidden = f".{name}{DELETE_MARK}{secrets.token_hex(4)}"
        self.storage.rename(name, hidden)
        self.storage.delete(hidden)

    def close(self) -> None:
        """Wait for the background save in flight; remove the tier's process groups."""
        self.wait()
        for g in (self.group, self.ctl):
            if g is not None:
                self.dist.destroy_process_group(g)
        self.group = self.ctl = None

    def promote(self, step: int, storage, name: str) -> None:
        """Make local ``step`` a durable checkpoint ``name`` of ``storage`` by copying its
        encoded files (promote.py). Collective."""
        promote_step(self, step, storage, name)

    def promote_or_warn(self, step: int, storage, name: str) -> bool:
        """``promote`` when the last local save committed ``step``; whether it did (on every
        rank alike). A failed promotion warns; the caller then saves the state as usual."""
        self.wait()  # a background save of ``step`` may still be committing
        return self.last_committed == step and _or_warn(
            lambda: self.promote(step, storage, name),
            f"promoting local step {step} failed, saving it instead")

    # ------------------------------------------------------------------ restore
    def restore(self, state, newer_than: int | None, load_options: dict) -> int | None:
        """Load the newest local step (newer than ``newer_than``, if given) complete across the
        nodes into ``state``; its step, or None. Collective."""
        self.wait()
        return restore_newest(self, state, newer_than, load_options)
