"""The save pipeline across ranks: plan -> write -> commit, as rounds of ``dist.Exchange``.

Round ``plan``: every rank flattens its state and describes the pieces it holds; the coordinator
merges the plans (``plan.merge_plans``), creates the temporary folder and answers who writes
what. Round ``write``: every rank encodes and writes its pieces into its own data file and reports
its chunk table; the coordinator builds the manifest and commits. A single process runs the same
rounds through ``LocalExchange``.
"""

from __future__ import annotations

import time
from dataclasses import replace

from . import manifest as manifest_mod
from .commit import RenameCommit
from .dist import exchange
from .plan import local_plan, merge_plans, plan_chunks
from .tree import flatten, rename_tensors
from .types import DATA_DIR, DTYPES, FileEntry, Manifest, TensorEntry, TensorItem
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
        return {"tmp": self.tx.tmp, "assign": {str(r): a for r, a in self.gp.assign.items()}}

    def commit(self, results: dict[int, dict]) -> dict:
        m = build_manifest(self.gp, self.plans, results, self.metadata)
        self.tx.commit(manifest_mod.to_json(m))
        return {"files": len(m.files)}

    def close(self) -> None:
        if self.begun:
            self.tx.close()


def build_manifest(gp, plans: dict[int, dict], results: dict[int, dict], metadata: dict
                   ) -> Manifest:
    """The global manifest from every rank's chunk table, with one codec table for all."""
    files, table, shards = [], CodecTable(), {}
    for rank in sorted(results):
        res = results[rank]
        base = len(files)
        files += [FileEntry(f["path"], f["size"], rank) for f in res["files"]]
        remap = [table.intern(tuple(c)) for c in res["codecs"]]
        for key, offsets, shape, chunks in res["shards"]:
            rows = [[base + c[0], c[1], c[2], c[3], c[4], remap[c[5]], c[6]] for c in chunks]
            shards.setdefault(key, []).append((offsets, shape, rows))
    tensors = {key: TensorEntry.build(DTYPES[dtype], tuple(shape), shards.get(key, []))
               for key, (dtype, shape) in gp.tensors.items()}
    trees = [rename_tensors(plans[r]["tree"], gp.renames[r]) if gp.renames[r]
             else plans[r]["tree"] for r in sorted(plans)]
    same = all(t == trees[0] for t in trees[1:])
    return Manifest(world_size=len(plans), files=tuple(files), codecs=tuple(table.chains),
                    tensors=tensors, tree=trees[0], metadata=metadata, created_unix=time.time(),
                    rank_trees=None if same else tuple(trees))


def write_rank(storage, tmp: str, rank: int, items: list[TensorItem], assigned,
               opts: WriteOptions) -> dict:
    """Write the pieces assigned to this rank into its data file; its chunk table as JSON."""
    if not assigned:
        return {"files": [], "codecs": [], "shards": [], "raw_bytes": 0}
    chosen = [replace(items[index], key=key) for index, key in assigned]
    rels = [f"{DATA_DIR}/rank-{rank:05d}" + (f".{i}" if i else "") + ".bin"
            for i in range(opts.files_per_rank)]
    sources, _hosts = plan_chunks(chosen, opts.chunk_bytes)  # hosts live until written
    table = CodecTable()
    refs, sizes, stats = write_data_files([(storage.local_path(f"{tmp}/{r}"), r) for r in rels],
                                          sources, opts, table)
    by_key = {item.key: [] for item in chosen}
    for src, ref in zip(sources, refs):
        by_key[src.key].append(ref.as_list())
    shards = [[it.key, list(it.offsets), list(it.tensor.shape), by_key[it.key]] for it in chosen]
    return {"files": [{"path": r, "size": n} for r, n in zip(rels, sizes)],
            "codecs": [list(c) for c in table.chains],
            "shards": shards, "raw_bytes": sum(s.nbytes for s in sources), "stats": stats}


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
            report = write_rank(storage, answer["tmp"], ex.rank, items,
                                answer["assign"].get(str(ex.rank), []), opts)
        except Exception as exc:
            error = exc
        ex.round("write", {k: v for k, v in (report or {}).items() if k != "stats"}, error,
                 coord and coord.commit)
        return report
    finally:
        if coord is not None:
            coord.close()
