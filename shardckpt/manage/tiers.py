"""The local tier: frequent checkpoints in node-local storage, each rank's data replicated on
other nodes, restored from the fastest complete copy (FORMAT.md 6).

A local checkpoint is an ordinary checkpoint folder ``<local_dir>/step-<n>`` on every node: the
same manifest (the whole checkpoint's) and the data files of the node's own ranks plus the
replicas it holds for ranks of ``replicas`` other nodes. ``{node}`` in ``local_dir`` is replaced
by the node index (torchrun's ``GROUP_RANK``, else ``RANK // LOCAL_WORLD_SIZE``).

Save (collective, ``LocalTier.save``): the plan round of the ordinary save; every rank encodes
and writes its files into the agreed hidden temporary folder on its node (the native writer,
fsync'ed); rank ``r`` sends its files to rank ``(r + k * L) % W`` for ``k`` in
``1..replicas`` (L ranks per node) and receives the ones of ``(r - k * L) % W``, over gloo
(transfer.py). Only when every rank reports its files and replicas durable does rank 0 build the
manifest; each node's first rank then writes it into its folder and renames the folder into
place (the same atomic commit as the durable tier). Any failure, a peer's death included, fails
the save on every rank and commits nothing.

Restore (``LocalTier.restore``): the ranks agree on the candidate steps (from every node's
committed local checkpoints), and for each, newest first, every node's first rank checks its
copy (manifest and every chunk's checksum, ``scan``). A step is complete when every data file
passes on some node. Files a node lacks, or holds corrupt, are fetched from a node holding a
good copy; then every rank loads from its own node's folder (resharding as any load does).
"""

from __future__ import annotations

import os
import secrets
import warnings
from datetime import timedelta

import torch

from .. import knobs, manifest as manifest_mod
from ..commit import DELETE_MARK, RenameCommit, is_committed, remove_leftovers
from ..dist import PerRank, node_index as dist_node_index
from ..errors import CheckpointError
from .layout import STEP_NAME, step_name
from ..merge import build_manifest
from ..plan import plan_chunks
from ..saver import plan_save, write_rank
from ..storage import LocalStorage
from .tier_transfer import exchange_files
from ..types import DATA_DIR
from ..write import WriteOptions

__all__ = ["LocalTier", "node_index", "local_path_for"]

_CANDIDATES = 8  # newest local steps each node offers to a restore


def node_index() -> int:
    """This process's node: ``GROUP_RANK`` (torchrun), else ``RANK // LOCAL_WORLD_SIZE``."""
    return dist_node_index(int(os.environ.get("RANK", "0") or 0))


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
    """One manager's local tier (see the module docstring). Construct it on every rank."""

    def __init__(self, local_dir, *, replicas: int = 1, keep: int = 1,
                 save_options: dict | None = None):
        import torch.distributed as dist
        if not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be an int >= 0, not {replicas!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"local_keep must be a positive int, not {keep!r}")
        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1
        self.node = node_index() if self.dist else 0
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
        self.replicas, self.keep = replicas, keep
        self.dir = local_path_for(local_dir, self.node)
        os.makedirs(self.dir, exist_ok=True)
        self.storage = LocalStorage(self.dir)
        self.leader = self.rank == min(r for r, n in enumerate(self.nodes_of) if n == self.node)
        self.save_options = dict(save_options or {})
        self.last_committed: int | None = None  # the step of the last local save, if it committed

    # ------------------------------------------------------------------ group
    def _gather_nodes(self) -> list[int]:
        self.group = None
        if not self.dist or self.world == 1:
            return [0]
        timeout = timedelta(seconds=float(knobs.get("dist_timeout")))
        self.group = self.dist.new_group(backend="gloo", timeout=timeout)
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self.dist.all_gather(out, torch.tensor([node_index()], dtype=torch.int64),
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
        """Steps committed in this node's local dir, ascending."""
        found = sorted(int(m.group(1)) for n in self.storage.list("")
                       if (m := STEP_NAME.fullmatch(n)))
        return [s for s in found if is_committed(self.storage, step_name(s))]

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, metadata: dict) -> None:
        """Save ``state`` as local step ``step`` on every node, with its replicas (collective).

        Raises DiskFullError / StorageError / TransferError here, RankFailureError on the
        other ranks; then nothing was committed and older local checkpoints are untouched.
        """
        opts = WriteOptions.resolve(**{k: v for k, v in self.save_options.items()
                                       if k in WriteOptions.__dataclass_fields__})
        name = step_name(step)
        planned = plan_save(state, self.storage, name, opts, metadata, True, None,
                            indexed=False)  # the tier builds an inline manifest
        tmp = planned.tmp
        try:
            report, error = None, None
            try:
                report = self._write_and_replicate(planned, tmp, opts)
            except Exception as exc:
                error = exc
            coord = planned.coord
            answer = planned.ex.round(
                "local-write", report, error,
                coord and (lambda results: self._manifest(coord, results)))
            error = None
            try:
                if self.leader:
                    self._commit(name, tmp, answer["mine"].encode())
            except Exception as exc:
                error = exc
            planned.ex.round("local-commit", True, error, lambda _: True)
            self.last_committed = step
        finally:
            self.storage.delete(tmp)  # gone after a commit; a failed save's debris otherwise
            planned.close()
        if self.leader:
            self._retain(step)

    def save_or_warn(self, step: int, state, metadata: dict) -> bool:
        """``save``, with a failure turned into a warning (the training and the durable tier go
        on; the previous local checkpoint stays usable). Whether it committed."""
        return _or_warn(lambda: self.save(step, state, metadata),
                        f"local save of step {step} to {self.dir} failed, nothing committed")

    def _write_and_replicate(self, planned, tmp: str, opts) -> dict:
        self.storage.makedirs(f"{tmp}/{DATA_DIR}")  # rank 0 made node 0's; the others theirs
        report, failed = {"files": []}, None
        try:
            sources, hosts = plan_chunks(planned.pieces(), opts.chunk_bytes)
            keys = [str(int(i)) for i in planned.assigned]
            report = write_rank(self.storage, tmp, self.rank, keys, [(sources, hosts.clear)],
                                opts)
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
        """Keep the ``keep`` newest committed local steps on this node; remove debris."""
        others = [s for s in self.steps() if s != newest]
        for s in others[:max(len(others) - (self.keep - 1), 0)]:
            self._remove(step_name(s))
        remove_leftovers(self.storage)

    def _remove(self, name: str) -> None:
        hidden = f".{name}{DELETE_MARK}{secrets.token_hex(4)}"
        self.storage.rename(name, hidden)
        self.storage.delete(hidden)

    def close(self) -> None:
        """Remove the tier's process group."""
        if self.group is not None:
            self.dist.destroy_process_group(self.group)
            self.group = None

    def promote(self, step: int, storage, name: str) -> None:
        """Make local ``step`` a durable checkpoint ``name`` of ``storage`` by copying its
        encoded files (tier_promote.py). Collective."""
        from .tier_promote import promote
        promote(self, step, storage, name)

    def promote_or_warn(self, step: int, storage, name: str) -> bool:
        """``promote`` when the last local save committed ``step``; whether it did (on every
        rank alike). A failed promotion warns; the caller then saves the state as usual."""
        return self.last_committed == step and _or_warn(
            lambda: self.promote(step, storage, name),
            f"promoting local step {step} failed, saving it instead")

    # ------------------------------------------------------------------ restore
    def restore(self, state, newer_than: int | None, load_options: dict) -> int | None:
        """Load the newest local step (newer than ``newer_than``, if given) complete across the
        nodes into ``state``; its step, or None. Collective."""
        from .tier_restore import restore_newest
        return restore_newest(self, state, newer_than, load_options)
