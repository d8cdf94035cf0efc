"""Save's pipeline across ranks: plan -> merge -> write -> commit, as rounds of ``dist.rounds``.

Round ``plan``: every rank flattens its state and describes the pieces it holds; the coordinator
merges the plans (merge.py), creates the temporary folder and answers who writes what. Round
``write``: every rank encodes and writes its pieces into its own data files and reports its chunk
table; the coordinator builds the manifest and commits. A single process runs the same rounds
through ``LocalExchange``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from ..format import chunk_index, manifest as manifest_mod, retire, tables
from .. import codecs, knobs
from . import incremental, upload
from .commit import commit_for
from ..dist.rounds import PerRank, exchange
from ..errors import UnsupportedValueError
from .merge import build_manifest, merged, target_rows
from .plan import local_plan, plan_chunks
from ..format.tree import flatten_split
from ..types import DATA_DIR, HEADER_BYTES, TensorItem
from .write import CodecTable, WriteOptions, add_stats, write_data_files


class Coordinator:
    """Rank 0's side of a save: owns the temporary folder and writes the manifest."""

    def __init__(self, storage, name: str, overwrite: bool, metadata: dict,
                 indexed: bool = False, in_place: bool = False):
        self.storage, self.name, self.metadata, self.indexed = storage, name, metadata, indexed
        self.tx = commit_for(storage, name, overwrite, in_place)
        self.plans, self.gp, self.begun = None, None, False

    def plan(self, plans: dict[int, dict]) -> dict:
        self.plans, self.gp = plans, merged(plans, self.indexed)
        if self.tx.overwrite:  # never replace a checkpoint whose files others reference
            retire.check_replaceable(self.storage, self.name)
        self.tx.begin()
        self.begun = True
        if self.indexed:
            return PerRank({"tmp": self.tx.tmp, "indexed": True,
                            "templates": self.gp.templates}, self.gp.answers)
        return PerRank({"tmp": self.tx.tmp},
                       {r: tables.encode(a) for r, a in self.gp.assign.items()})

    def commit(self, results: dict[int, dict]) -> dict:
        m = build_manifest(self.gp, self.plans, results, self.metadata)
        manifest_mod.check_complete(m, self.storage.url(self.name))
        self.tx.commit(manifest_mod.to_json(m))
        return {"files": len(m.files)}

    def close(self) -> None:
        if self.begun:
            self.tx.close()


def check_metadata(metadata) -> dict:
    """``metadata`` (None: empty) as a dict of plain JSON; raises UnsupportedValueError."""
    metadata = {} if metadata is None else metadata
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UnsupportedValueError(f"metadata must be plain JSON: {exc}") from None
    if not isinstance(metadata, dict):
        raise UnsupportedValueError("metadata must be a dict")
    return metadata


def _rels(rank: int, batch: int, files: int) -> list[str]:
    stem = f"{DATA_DIR}/rank-{rank:05d}" + (f".b{batch}" if batch else "")
    return [stem + (f".{i}" if i else "") + ".bin" for i in range(files)]


def write_rank(storage, tmp: str, rank: int, pieces: list[str], batches,
               opts: WriteOptions, index=None, placed=None) -> dict:
    """Write this rank's pieces into its data files, batch after batch; the report: files,
    codec chains, ``[item, nchunks]`` per piece and the chunk rows, as int64 tables.

    ``batches`` yields ``(sources, done)``: chunk sources whose ``key`` is the item index as
    text, and a callback run once they are written (it frees a staging buffer), or None.
    ``pieces`` lists every piece's key (an empty tensor has no chunks, but is a piece).
    With ``index`` (an incremental save, incremental.BaseIndex) chunks the base already stores
    become reference rows; a data file left with nothing but its header is removed.
    With ``placed`` (``[item, tensor, shard]`` rows, FORMAT.md 3.7) the chunk rows go into this
    rank's index file instead of the report.
    """
    report = _RankReport(pieces, opts, index)
    for batch, (sources, done) in enumerate(batches):
        rels = _rels(rank, batch, opts.files_per_rank)
        refs, sizes, hashes = [], [], []
        if sources:
            targets, write_one = upload.write_targets(storage, tmp, rels)
            refs, sizes, stats = write_data_files(targets, sources, opts, report.table,
                                                  write_one, report.known, hashes)
            add_stats(report.stats, stats, concurrent=False)  # batches run one after another
        kept = _drop_empty(storage, tmp, rels, sizes)
        report.files += [{"path": r, "size": n} for r, n in zip(rels, sizes) if n > HEADER_BYTES]
        extra = report.add(sources, refs, hashes, kept)
        if extra:  # skipped chunks that repeat a stored one more often than the base has it
            rel = f"{rels[0][:-4]}.x.bin"
            targets, write_one = upload.write_targets(storage, tmp, [rel])
            refs, sizes, stats = write_data_files(
                targets, [sources[k] for k in extra], replace(opts, content_hashes=False),
                report.table, write_one)
            add_stats(report.stats, stats, concurrent=False)
            report.files.append({"path": rel, "size": sizes[0]})
            report.add([sources[k] for k in extra], refs, [hashes[k] for k in extra], {0: 0})
        report.raw += sum(s.nbytes for s in sources)
        if done is not None:
            done()
    if placed is None:
        return report.as_dict()
    return report.write_index(storage, tmp, rank, placed)


class _RankReport:
    """What one rank's write round reports, gathered batch after batch."""

    def __init__(self, pieces: list[str], opts: WriteOptions, index):
        self.opts, self.index = opts, index
        self.known = index.known if index is not None else b""
        self.files, self.table, self.stats, self.raw = [], CodecTable(), {}, 0
        self.rows: dict[str, list] = {key: [] for key in pieces}
        self.digests: dict[str, list] = {key: [] for key in pieces}

    def add(self, sources, refs, hashes, kept: dict[int, int]) -> list[int]:
        """Record the rows of chunks just written (``refs``; ``kept`` maps their file to its
        place among the batch's files, which are the last ``len(kept)`` of ``files``) or
        skipped (ref None: referenced). Returns the skipped ones that cannot be referenced."""
        extra, first = [], len(self.files) - len(kept)
        for k, (src, ref) in enumerate(zip(sources, refs)):
            if ref is None:
                row = self.index.reference(hashes[k], src.start, src.count, src.nbytes,
                                           self.table)
                if row is None:
                    extra.append(k)
                    continue
            else:
                row = ref.as_list()
                row[0] = first + kept[row[0]]
            self.rows[src.key].append(row)
            self.digests[src.key].append(hashes[k] if hashes and hashes[k] else b"")
        return extra

    def as_dict(self) -> dict:
        rows = self.rows
        counts = np.array([[int(k), len(v)] for k, v in rows.items()], np.int64).reshape(-1, 2)
        chunks = np.array([r for v in rows.values() for r in v], np.int64).reshape(-1, 7)
        report = {"files": self.files, "codecs": [list(c) for c in self.table.chains],
                  "pieces": tables.encode(counts), "chunks": tables.encode(chunks),
                  "raw_bytes": self.raw, "tensors": len(rows), "stats": self.stats}
        if self.opts.content_hashes:
            flat = b"".join(d for v in self.digests.values() for d in v)
            report["hashes"] = tables.encode(np.frombuffer(flat, "<i8").reshape(-1, 2))
        if self.index is not None:
            report["ref_files"] = self.index.ref_files
        return report

    def write_index(self, storage, tmp: str, rank: int, placed: np.ndarray) -> dict:
        """Write this rank's chunk index (FORMAT.md 3.7); the report names it instead of rows."""
        where = {int(i): (int(t), int(s)) for i, t, s in placed.tolist()}
        rows = [[*where[int(k)], *row] for k, v in self.rows.items() for row in v]
        data = chunk_index.to_bytes(rank, [f["path"] for f in self.files], self.table.chains,
                                    np.array(rows, np.int64).reshape(-1, chunk_index.COLUMNS))
        rel = chunk_index.index_path(rank)
        storage.write(f"{tmp}/{rel}", data, durable=True)
        return {"files": self.files, "raw_bytes": self.raw, "tensors": len(self.rows),
                "stats": self.stats,
                "index": {"path": rel, "size": len(data), "crc32c": codecs.backend.crc32c(data)}}


def _drop_empty(storage, tmp: str, rels: list[str], sizes: list[int]) -> dict[int, int]:
    """Delete the data files of a batch that hold only the header (every chunk was
    referenced); returns each kept file's new index."""
    kept = {}
    for i, (rel, size) in enumerate(zip(rels, sizes)):
        if size > HEADER_BYTES:
            kept[i] = len(kept)
        else:
            storage.delete(f"{tmp}/{rel}")
    return kept


class PlannedSave:
    """A save whose plan round is done: this rank knows what it writes and where."""

    def __init__(self, ex, coord, storage, answer: dict, items: list[TensorItem], opts,
                 index=None):
        self.ex, self.coord, self.storage, self.opts = ex, coord, storage, opts
        self.index = index  # incremental.BaseIndex of an incremental save
        self.tmp, self.items = answer["tmp"], items
        self.targets = (target_rows(answer, answer["mine"]) if answer.get("indexed")
                        else None)
        self.assigned = (self.targets[:, 0] if self.targets is not None else
                         tables.decode(answer["mine"], 1, "assignment")[:, 0])

    def pieces(self) -> list[TensorItem]:
        """The items this rank writes, keyed by their item index."""
        items = self.items
        return [TensorItem(str(i), items[i].tensor, items[i].global_shape, items[i].offsets,
                           items[i].dtensor, items[i].rule) for i in self.assigned.tolist()]

    def finish(self, batches=None) -> dict:
        """The write round and the commit; returns this rank's report. ``batches`` as for
        ``write_rank`` (default: every piece at once, from the tensors themselves)."""
        try:
            report, error = None, None
            try:
                if batches is None:
                    sources, hosts = plan_chunks(self.pieces(), self.opts.chunk_bytes)
                    batches = [(sources, hosts.clear)]  # hosts live until written
                keys = [str(int(i)) for i in self.assigned]
                report = write_rank(self.storage, self.tmp, self.ex.rank, keys, batches,
                                    self.opts, self.index, self.targets)
            except Exception as exc:
                error = exc
            self.ex.round("write", {k: v for k, v in (report or {}).items() if k != "stats"},
                          error, self.coord and self.coord.commit)
            return report
        finally:
            self.close()

    def close(self) -> None:
        if self.coord is not None:
            self.coord.close()


def uses_index(world: int, opts: WriteOptions, base: str | None) -> bool:
    """Whether a save writes chunk index files (FORMAT.md 3.7; knob ``chunk_index``): by
    default when several ranks save; never with content hashes (incremental saves), which
    revision 1.4 keeps in the inline form."""
    choice = str(knobs.get("chunk_index"))
    if base is not None or opts.content_hashes or choice == "0":
        return False
    return choice == "1" or world > 1


def plan_save(state, storage, name: str, opts: WriteOptions, metadata: dict, overwrite: bool,
              timeout: float | None, base: str | None = None,
              indexed: bool | None = None, in_place: bool = False) -> PlannedSave:
    """Flatten the state and run the plan round (collective). Raises RankFailureError (several
    ranks) or the error itself (one process); then nothing was created. ``base``: the sibling
    checkpoint an incremental save references (incremental.py); it implies content hashes.
    ``indexed``: whether to write chunk index files (default: ``uses_index``). ``in_place``:
    see ``commit_for``."""
    ex = exchange(timeout)
    if base is not None:
        opts = replace(opts, content_hashes=True)
    if indexed is None:
        indexed = uses_index(ex.world, opts, base)
    coord = Coordinator(storage, name, overwrite, metadata, indexed, in_place) \
        if ex.rank == 0 else None
    try:
        items, plan, error, index = [], None, None, None
        try:
            skeleton, values, items = flatten_split(state)
            plan = local_plan(skeleton, values, items, ex.world, rules=indexed)
            index = incremental.open_base(storage, base)
        except Exception as exc:
            error = exc
        answer = ex.round("plan", plan, error, coord and coord.plan)
        return PlannedSave(ex, coord, storage, answer, items, opts, index)
    except BaseException:
        if coord is not None:
            coord.close()
        raise


def run_save(state, storage, name: str, opts: WriteOptions, metadata: dict, overwrite: bool,
             timeout: float | None, base: str | None = None) -> dict:
    """Every rank's synchronous save; returns this rank's write report."""
    return plan_save(state, storage, name, opts, metadata, overwrite, timeout, base).finish()
