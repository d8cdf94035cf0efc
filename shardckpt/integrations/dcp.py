"""``torch.distributed.checkpoint`` adapters: DCP's planners, shardckpt's storage and format.

``dcp.save(sd, storage_writer=Writer(path))`` writes a shardckpt checkpoint (native pipeline,
atomic commit, format v1); ``dcp.load(sd, storage_reader=Reader(path))`` reads one, including
checkpoints written by ``shardckpt.save`` (tensor paths become DCP's dotted FQNs, split the way
DCP's own traversal splits a state dict). DCP's planners do the resharding. Nothing from the
checkpoint is ever unpickled: DCP's metadata, ``planner_data`` included, is rebuilt from the JSON
manifest and its tree; a non-tensor value is stored as a JSON tree node, and ``bytes`` /
``io.BytesIO`` values as uint8 tensors (FORMAT.md 3.4.1). DCP's load planner ``torch.load``s the
bytes handed to it, so the Reader hands it bytes it pickled itself from values decoded from JSON.

Call order (DCP drives it): Writer ``set_up_storage_writer`` (each rank; refuses DCP's rank-local
``use_collectives=False`` mode on several ranks) -> ``prepare_local_plan`` (each rank) ->
``prepare_global_plan`` (coordinator: creates the temporary folder) -> ``write_data`` (each
rank: its data file) -> ``finish`` (coordinator: manifest, checked to cover every tensor, then
the commit). The Writer stores DCP's nested structure (``planner_data``), not its flat names.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import time
from functools import partial

import torch
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                   Metadata, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ..format import manifest as manifest_mod
from ..save import (CodecTable, WriteOptions, commit_for, plan_chunks, write_data_files,
                    write_targets)
from ..errors import CheckpointError, UnsupportedSaveError, UnsupportedValueError
from ..load import ReadPlan, read_blob
from ..format.opening import open_for_read
from ..storage import open_checkpoint
from ..format.tree import Flattener, build, dict_items, escape, node_kind
from ..types import DATA_DIR, DTYPE_BY_TORCH, DTYPES, FileEntry, Manifest, TensorEntry, TensorItem


def _done(value) -> Future:
    fut: Future = Future()  # torch's future: DCP calls wait() on it
    fut.set_result(value)
    return fut


class Writer(StorageWriter):
    """A DCP StorageWriter that writes a shardckpt checkpoint folder at ``path`` (a folder or
    an fsspec URL; ``storage_options`` go to fsspec)."""

    def __init__(self, path, *, overwrite: bool = False, storage_options: dict | None = None,
                 **options):
        super().__init__()
        self.path, self.overwrite, self.storage_options = path, overwrite, storage_options
        self.opts = WriteOptions.resolve(**options)
        self.rank, self.tx = 0, None

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = checkpoint_id

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        import torch.distributed as dist
        self.rank = kwargs.get("rank", dist.get_rank() if dist.is_initialized() else 0)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if kwargs.get("use_collectives", True) is False and world > 1:
            # Every rank would plan and commit alone: each manifest would name only its own
            # shards, and the last rename would win. Refused on every rank, before any write.
            raise UnsupportedSaveError(
                f"{self.path}: dcp.save(use_collectives=False) on {world} ranks is not "
                "supported by shardckpt.integrations.dcp.Writer (one checkpoint needs one manifest that "
                "covers every rank's shards); use the default use_collectives=True")

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        storage, name = open_checkpoint(self.path, self.storage_options)
        self.tx = commit_for(storage, name, self.overwrite).begin()
        return [dataclasses.replace(p, storage_data=self.tx.tmp) for p in plans]

    def write_data(self, plan, planner) -> Future:
        storage, _ = open_checkpoint(self.path, self.storage_options)
        tensors, pending = [], []  # pending: (item, storage data or value node, its blobs)
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                node, blobs = _value_node(planner, item)
                pending.append((item, node, blobs))
                tensors += blobs
                continue
            data = planner.resolve_data(item).detach()
            t = TensorItem(f"{item.index.fqn}#{len(tensors)}", data,
                           tuple(item.tensor_data.size), tuple(item.tensor_data.chunk.offsets),
                           True)
            tensors.append(t)
            pending.append((item, None, [t]))
        written = self._write_tensors(storage, plan.storage_data, tensors) if tensors else {}
        results = []
        for item, node, blobs in pending:
            nbytes = sum(b.tensor.numel() * b.tensor.element_size() for b in blobs)
            if node is None:
                results.append(WriteResult(item.index, nbytes, written[blobs[0].key]))
            else:
                results.append(WriteResult(item.index, nbytes, {"value": node, "blobs": {
                    b.key: dict(written[b.key], shape=list(b.global_shape)) for b in blobs}}))
        return _done(results)

    def _write_tensors(self, storage, tmp, tensors: list[TensorItem]) -> dict:
        """Write ``tensors`` into this rank's data file; ``{key: storage data}`` for each."""
        rel = f"{DATA_DIR}/rank-{self.rank:05d}.bin"
        sources, _hosts = plan_chunks(tensors, self.opts.chunk_bytes)
        table = CodecTable()
        targets, write_one = write_targets(storage, tmp, [rel])
        refs, (size,), _ = write_data_files(targets, sources, self.opts, table, write_one)
        by_key = {t.key: [] for t in tensors}
        for src, ref in zip(sources, refs):
            by_key[src.key].append(ref.as_list())
        file = {"path": rel, "size": size, "rank": self.rank}
        codecs = [list(c) for c in table.chains]
        return {key: {"file": file, "codecs": codecs, "chunks": rows}
                for key, rows in by_key.items()}

    def finish(self, metadata: Metadata, results) -> None:
        try:
            m = _manifest_from_dcp(metadata, [r for rank in results for r in rank])
            storage, name = open_checkpoint(self.path, self.storage_options)
            manifest_mod.check_complete(m, storage.url(name))
            self.tx.commit(manifest_mod.to_json(m))
        finally:
            self.tx.close()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True  # folders and fsspec URLs alike

    def storage_meta(self):
        return None


def _value_node(planner, item) -> tuple[dict, list[TensorItem]]:
    """A non-tensor value as a JSON tree node, and the uint8 tensors of its bytes values.

    The value is taken from the planner's state dict where it offers one (so bytes and
    ``io.BytesIO`` values are never unpickled); otherwise from the bytes DCP pickled, with
    torch's weights-only loader (the saving side trusts itself, but only to plain values)."""
    fqn = item.index.fqn
    lookup = getattr(planner, "lookup_object", None)
    if lookup is not None:
        value = lookup(item.index)
    else:
        buf = planner.resolve_data(item)
        buf.seek(0)
        try:
            value = torch.load(buf, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
            raise UnsupportedValueError(f"{fqn}: not a plain value ({exc})") from None
    f = Flattener()
    # Bytes values get keys of their own under the FQN, apart from every tensor FQN.
    blob_root = escape(f"{fqn}::bytes")
    try:
        node = f.node(value, blob_root)
    except UnsupportedValueError as exc:
        raise UnsupportedValueError(str(exc).replace(blob_root, fqn)) from None
    return _blob_nodes_only(node, fqn), f.items


def _blob_nodes_only(node: dict, fqn: str) -> dict:
    """``node``, after checking it names tensors only through bytes nodes."""
    kind, payload = node_kind(node)
    if kind == "tensor":
        raise UnsupportedValueError(f"{fqn}: a non-tensor DCP item holds tensors")
    if kind == "dict":
        for _, v in dict_items(payload):
            _blob_nodes_only(v, fqn)
    elif kind in ("list", "tuple"):
        for v in payload:
            _blob_nodes_only(v, fqn)
    return node


class _Files:
    """The files table of a manifest being built from every rank's write results."""

    def __init__(self):
        self.files, self.index, self.table = [], {}, CodecTable()

    def rows(self, data: dict) -> list[list[int]]:
        """A result's chunk rows, renumbered into the merged files and codec tables."""
        f = data["file"]
        if f["path"] not in self.index:
            self.index[f["path"]] = len(self.files)
            self.files.append(FileEntry(f["path"], f["size"], f["rank"]))
        remap = [self.table.intern(tuple(c)) for c in data["codecs"]]
        return [[self.index[f["path"]], c[1], c[2], c[3], c[4], remap[c[5]], c[6]]
                for c in data["chunks"]]


def _manifest_from_dcp(metadata: Metadata, results: list[WriteResult]) -> Manifest:
    files, shards, values, tensors = _Files(), {}, {}, {}
    for res in results:
        data, fqn = res.storage_data, res.index.fqn
        if "value" in data:
            values[fqn] = data["value"]
            for key, blob in data["blobs"].items():
                shape = tuple(blob["shape"])
                tensors[key] = TensorEntry.build(DTYPES["uint8"], shape,
                                                 [((0,), shape, files.rows(blob))])
            continue
        offsets = tuple(res.index.offset)
        sizes = next(tuple(c.sizes) for c in metadata.state_dict_metadata[fqn].chunks
                     if tuple(c.offsets) == offsets)
        shards.setdefault(fqn, []).append((offsets, sizes, files.rows(data)))
    leaves = []
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            tensors[fqn] = TensorEntry.build(DTYPE_BY_TORCH[meta.properties.dtype],
                                             tuple(meta.size), shards.get(fqn, []))
            leaves.append((fqn, {"tensor": fqn}))
        else:
            leaves.append((fqn, values[fqn]))
    world = len({f.rank for f in files.files}) or 1
    return Manifest(world_size=world, files=tuple(files.files), codecs=tuple(files.table.chains),
                    tensors=tensors, tree=_nested_tree(leaves, metadata.planner_data),
                    metadata={"written_by": "dcp"}, created_unix=time.time())


def _nested_tree(leaves: list[tuple[str, dict]], paths) -> dict:
    """The state tree with DCP's flattened names put back where they came from: ``paths``
    (DCP's ``planner_data``) maps each dotted name to its key path, string keys for dicts and
    integer indices for lists. Without a path for every name the tree stays flat."""
    if not isinstance(paths, dict) or not all(
            isinstance(paths.get(fqn), (tuple, list)) and paths[fqn] for fqn, _ in leaves):
        return {"dict": [[fqn, node] for fqn, node in leaves]}
    root: dict = {}
    for fqn, node in leaves:
        at = root
        for step in paths[fqn][:-1]:
            at = at.setdefault(step, {})
            if not isinstance(at, dict):  # a path runs through a leaf: keep DCP's flat names
                return {"dict": [[fqn, node] for fqn, node in leaves]}
        at[paths[fqn][-1]] = _Leaf(node)
    return _to_node(root)


class _Leaf:
    """A finished tree node inside the nested dicts ``_nested_tree`` builds."""

    __slots__ = ("node",)

    def __init__(self, node: dict):
        self.node = node


def _to_node(level) -> dict:
    """Nested dicts of ``_Leaf`` as a tree: a level keyed 0..n-1 by ints was a list."""
    if isinstance(level, _Leaf):
        return level.node
    keys = list(level)
    if keys and all(isinstance(k, int) and not isinstance(k, bool) for k in keys) \
            and sorted(keys) == list(range(len(keys))):
        return {"list": [_to_node(level[i]) for i in range(len(keys))]}
    return {"dict": [[k, _to_node(v)] for k, v in level.items()]}


class Reader(StorageReader):
    """A DCP StorageReader over a shardckpt checkpoint folder or URL (from ``Writer`` or
    ``save``)."""

    def __init__(self, path, *, threads: int | None = None,
                 storage_options: dict | None = None):
        super().__init__()
        self.path, self.threads, self.storage_options = path, threads, storage_options
        self.m, self.leaves, self.failed = None, {}, None

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = checkpoint_id

    def read_metadata(self, *args, **kwargs) -> Metadata:
        """The checkpoint's DCP metadata.

        DCP's loader catches what this raises and keeps only its text, in an AssertionError.
        So a CheckpointError is kept and raised by ``set_up_storage_reader``, which DCP lets
        through: in the ``failures`` of DCP's CheckpointException (``failures[rank][0]``), on
        every rank. An empty Metadata stands in meanwhile, so every rank reaches the same
        collective steps.
        """
        try:
            self.m, self.paths = open_for_read(self.path, self.storage_options)
        except CheckpointError as exc:
            self.failed = exc
            return Metadata(state_dict_metadata={})
        self.failed = None
        self.leaves, planner_data = {}, {}
        for path, node in _dcp_leaves(self.m.tree):
            fqn = ".".join(str(p) for p in path)
            self.leaves[fqn], planner_data[fqn] = node, path
        meta = {}
        for fqn, node in self.leaves.items():
            kind, payload = node_kind(node)
            if kind != "tensor":
                meta[fqn] = BytesStorageMetadata()
                continue
            entry = self.m.tensors[payload]
            meta[fqn] = TensorStorageMetadata(
                TensorProperties(dtype=entry.dtype.torch), torch.Size(entry.shape),
                [ChunkStorageMetadata(torch.Size(s.offsets), torch.Size(s.shape))
                 for s in entry.shards])
        return Metadata(state_dict_metadata=meta, planner_data=planner_data)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args,
                              **kwargs) -> None:
        if self.failed is not None:
            raise self.failed
        if self.m is None:
            self.read_metadata()

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner) -> Future:
        reads, pending = ReadPlan(self.m), []
        for item in plan.items:
            node = self.leaves[item.storage_index.fqn]
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, self._pickled(node))
                continue
            _, payload = node_kind(node)
            dest = planner.resolve_tensor(item).detach()
            origin = tuple(a + b for a, b in zip(item.storage_index.offset,
                                                 item.storage_offsets))
            reads.into(payload, dest, origin)
            pending.append((item, dest))
        reads.run(self.paths, self.threads)
        for item, dest in pending:
            planner.commit_tensor(item, dest)
        return _done(None)

    def _pickled(self, node) -> io.BytesIO:
        """A value for DCP's planner, which ``torch.load``s what it is handed: pickled here
        from the value built from JSON (and bytes read raw), never the checkpoint's bytes."""
        buf = io.BytesIO()
        torch.save(build(node, _no_tensor, blob=partial(read_blob, self.m, self.paths)), buf)
        buf.seek(0)
        return buf

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True  # folders and fsspec URLs alike


def _no_tensor(key):
    raise UnsupportedValueError(f"tensor {key} inside a non-tensor value")


def _dcp_terminal(node) -> bool:
    """DCP's rule (``_traverse.traverse_state_dict``): a list is split into its elements only
    when some element, at any depth, is a tensor or a dict; tuples and other values are leaves."""
    kind, payload = node_kind(node)
    if kind == "dict":
        return False
    if kind != "list":
        return True
    for v in payload:
        k = node_kind(v)[0]
        if k == "tensor" or (k in ("dict", "list") and not _dcp_terminal(v)):
            return False
    return True


def _dcp_leaves(node, path=()):
    """``(path, node)`` of every leaf DCP would name, the path as DCP's ``planner_data`` holds
    it (dict keys as text, list indices as ints); the FQN is the path joined by dots."""
    kind, payload = node_kind(node)
    if kind == "dict":
        for k, v in dict_items(payload):
            yield from _dcp_leaves(v, path + (str(k),))
    elif kind == "list" and not _dcp_terminal(node):
        for i, v in enumerate(payload):
            yield from _dcp_leaves(v, path + (i,))
    else:
        yield path, node
