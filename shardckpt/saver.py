"""The save pipeline across ranks: plan -> write -> commit, as rounds of ``dist.Exchange``.

Round ``plan``: every rank flattens its state and describes the pieces it holds; the coordinator
merges the plans (merge.py), creates the temporary folder and answers who writes what. Round
``write``: every rank encodes and writes its pieces into its own data files and reports its chunk
table; the coordinator builds the manifest and commits. A single process runs the same rounds
through ``LocalExchange``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import manifest as manifest_mod, tables
from .commit import RenameCommit
from .dist import PerRank, exchange
from .merge import build_manifest, merge_plans
from .plan import local_plan, plan_chunks
from .tree import flatten
from .types import DATA_DIR, TensorItem
from .write import CodecTable, WriteOptions, write_data_files


class Coordinator:
    """Rank 0's side of a save: owns the temporary folder and writes the manifest."""

    def __init__(self, storage, name: str, overwrite: bool, metadata: dict):
        self.storage, self.name, self.metadata = storage, name, metadata
        self.tx = RenameCommit(storage, name, overwrite)
        self.plans, self.gp, self.begun = None, None, False

    def plan(self, plans: dict[int, dict]) -> dict:
        self.plans, self.gp = plans, merge_plans(plans)
        self.tx.begin()
        self.begun = True
        return PerRank({"tmp": self.tx.tmp},
                       {r: tables.encode(a) for r, a in self.gp.assign.items()})

    def commit(self, results: dict[int, dict]) -> dict:
        m = build_manifest(self.gp, self.plans, results, self.metadata)
        self.tx.commit(manifest_mod.to_json(m))
        return {"files": len(m.files)}

    def close(self) -> None:
        if self.begun:
            self.tx.close()


def write_rank(storage, tmp: str, rank: int, items: list[TensorItem], assigned: np.ndarray,
               opts: WriteOptions) -> dict:
    """Write the pieces (item indices) assigned to this rank into its data files; the report:
    files, codec chains, ``[item, nchunks]`` per piece and the chunk rows, as int64 tables."""
    chosen = [replace(items[int(i)], key=str(int(i))) for i in assigned]
    rels = [f"{DATA_DIR}/rank-{rank:05d}" + (f".{i}" if i else "") + ".bin"
            for i in range(opts.files_per_rank)]
    sources, _hosts = plan_chunks(chosen, opts.chunk_bytes)  # hosts live until written
    table = CodecTable()
    refs, sizes = [], []
    if sources:
        refs, sizes, stats = write_data_files(
            [(storage.local_path(f"{tmp}/{r}"), r) for r in rels], sources, opts, table)
    else:
        stats = {}
    rows = {item.key: [] for item in chosen}
    for src, ref in zip(sources, refs):
        rows[src.key].append(ref.as_list())
    pieces = np.array([[int(it.key), len(rows[it.key])] for it in chosen], np.int64)
    chunks = np.array([r for it in chosen for r in rows[it.key]], np.int64).reshape(-1, 7)
    return {"files": [{"path": r, "size": n} for r, n in zip(rels, sizes)],
            "codecs": [list(c) for c in table.chains], "pieces": tables.encode(pieces),
            "chunks": tables.encode(chunks), "raw_bytes": sum(s.nbytes for s in sources),
            "tensors": len(chosen),
            "stats": stats}


def run_save(state, storage, name: str, opts: WriteOptions, metadata: dict, overwrite: bool,
             timeout: float | None) -> dict:
    """Every rank's save; returns this rank's write report. Raises RankFailureError (several
    ranks) or the error itself (one process)."""
    ex = exchange(timeout)
    coord = Coordinator(storage, name, overwrite, metadata) if ex.rank == 0 else None
    try:
        items, plan, error = [], None, None
        try:
            tree, items = flatten(state)
            plan = local_plan(tree, items, ex.world)
        except Exception as exc:
            error = exc
        answer = ex.round("plan", plan, error, coord and coord.plan)
        report, error = None, None
        try:
            assigned = tables.decode(answer["mine"], 1, "assignment")[:, 0]
            report = write_rank(storage, answer["tmp"], ex.rank, items, assigned, opts)
        except Exception as exc:
            error = exc
        ex.round("write", {k: v for k, v in (report or {}).items() if k != "stats"}, error,
                 coord and coord.commit)
        return report
    finally:
        if coord is not None:
            coord.close()
