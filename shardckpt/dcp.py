"""``torch.distributed.checkpoint`` adapters: DCP's planners, shardckpt's storage and format.

``dcp.save(sd, storage_writer=Writer(path))`` writes a shardckpt checkpoint (native pipeline,
atomic commit, format v1); ``dcp.load(sd, storage_reader=Reader(path))`` reads one, including
checkpoints written by ``shardckpt.save`` (tensor paths become DCP's dotted FQNs). DCP's planners
do the resharding. Nothing from the checkpoint is ever unpickled: DCP's metadata is rebuilt from
the JSON manifest, and a non-tensor value is stored as a JSON tree node; DCP's load planner
``torch.load``s the bytes handed to it, so the Reader hands it bytes it pickled itself from values
decoded from JSON.

Call order (DCP drives it): Writer ``set_up_storage_writer`` -> ``prepare_local_plan`` (each
rank) -> ``prepare_global_plan`` (coordinator: creates the temporary folder) ->
``write_data`` (each rank: its data file) -> ``finish`` (coordinator: manifest + commit).
"""

from __future__ import annotations

import dataclasses
import io
import time
import torch
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                   Metadata, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import manifest as manifest_mod
from .commit import commit_for
from .errors import UnsupportedValueError
from .plan import plan_chunks
from .read import ReadPlan, open_for_read
from .saver import _targets
from .storage import open_checkpoint
from .tree import build, dict_items, flatten, node_kind
from .types import DATA_DIR, DTYPE_BY_TORCH, FileEntry, Manifest, TensorEntry, TensorItem
from .write import CodecTable, WriteOptions, write_data_files


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

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        storage, name = open_checkpoint(self.path, self.storage_options)
        self.tx = commit_for(storage, name, self.overwrite).begin()
        return [dataclasses.replace(p, storage_data=self.tx.tmp) for p in plans]

    def write_data(self, plan, planner) -> Future:
        storage, _ = open_checkpoint(self.path, self.storage_options)
        tensors, results = [], []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                results.append(WriteResult(item.index, 0, {"value": _value_node(
                    planner.resolve_data(item), item.index.fqn)}))
                continue
            data = planner.resolve_data(item).detach()
            chunk = item.tensor_data.chunk
            tensors.append((item, TensorItem(f"{item.index.fqn}#{len(tensors)}", data,
                                             tuple(item.tensor_data.size),
                                             tuple(chunk.offsets), True)))
        if tensors:
            results += self._write_tensors(storage, plan.storage_data, tensors)
        return _done(results)

    def _write_tensors(self, storage, tmp, tensors) -> list[WriteResult]:
        rel = f"{DATA_DIR}/rank-{self.rank:05d}.bin"
        sources, _hosts = plan_chunks([t for _, t in tensors], self.opts.chunk_bytes)
        table = CodecTable()
        targets, write_one = _targets(storage, tmp, [rel])
        refs, (size,), _ = write_data_files(targets, sources, self.opts, table, write_one)
        by_key = {t.key: [] for _, t in tensors}
        for src, ref in zip(sources, refs):
            by_key[src.key].append(ref.as_list())
        file = {"path": rel, "size": size, "rank": self.rank}
        codecs = [list(c) for c in table.chains]
        return [WriteResult(item.index, t.tensor.numel() * t.tensor.element_size(),
                            {"file": file, "codecs": codecs, "chunks": by_key[t.key]})
                for item, t in tensors]

    def finish(self, metadata: Metadata, results) -> None:
        try:
            m = _manifest_from_dcp(metadata, [r for rank in results for r in rank])
            self.tx.commit(manifest_mod.to_json(m))
        finally:
            self.tx.close()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True  # folders and fsspec URLs alike

    def storage_meta(self):
        return None


def _value_node(buf: io.BytesIO, fqn: str) -> dict:
    """A non-tensor value DCP pickled, as a JSON tree node (the saving side trusts itself)."""
    buf.seek(0)
    value = torch.load(buf, weights_only=True)
    node, items = flatten(value)
    if items:
        raise UnsupportedValueError(f"{fqn}: a non-tensor DCP item holds tensors")
    return node


def _manifest_from_dcp(metadata: Metadata, results: list[WriteResult]) -> Manifest:
    files, file_index, table, shards, values = [], {}, CodecTable(), {}, {}
    for res in results:
        data = res.storage_data
        fqn = res.index.fqn
        if "value" in data:
            values[fqn] = data["value"]
            continue
        f = data["file"]
        if f["path"] not in file_index:
            file_index[f["path"]] = len(files)
            files.append(FileEntry(f["path"], f["size"], f["rank"]))
        remap = [table.intern(tuple(c)) for c in data["codecs"]]
        rows = [[file_index[f["path"]], c[1], c[2], c[3], c[4], remap[c[5]], c[6]]
                for c in data["chunks"]]
        offsets = tuple(res.index.offset)
        sizes = next(tuple(c.sizes) for c in metadata.state_dict_metadata[fqn].chunks
                     if tuple(c.offsets) == offsets)
        shards.setdefault(fqn, []).append((offsets, sizes, rows))
    tensors, tree = {}, []
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            tensors[fqn] = TensorEntry.build(DTYPE_BY_TORCH[meta.properties.dtype],
                                             tuple(meta.size), shards.get(fqn, []))
            tree.append([fqn, {"tensor": fqn}])
        else:
            tree.append([fqn, values[fqn]])
    world = len({f.rank for f in files}) or 1
    return Manifest(world_size=world, files=tuple(files), codecs=tuple(table.chains),
                    tensors=tensors, tree={"dict": tree}, metadata={"written_by": "dcp"},
                    created_unix=time.time())


class Reader(StorageReader):
    """A DCP StorageReader over a shardckpt checkpoint folder or URL (from ``Writer`` or
    ``save``)."""

    def __init__(self, path, *, threads: int | None = None,
                 storage_options: dict | None = None):
        super().__init__()
        self.path, self.threads, self.storage_options = path, threads, storage_options
        self.m, self.leaves = None, {}

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = checkpoint_id

    def read_metadata(self, *args, **kwargs) -> Metadata:
        self.m, self.paths = open_for_read(self.path, self.storage_options)
        self.leaves = dict(_dotted_leaves(self.m.tree))
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
        return Metadata(state_dict_metadata=meta)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args,
                              **kwargs) -> None:
        if self.m is None:
            self.read_metadata()

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner) -> Future:
        reads, pending = ReadPlan(self.m), []
        for item in plan.items:
            _, payload = node_kind(self.leaves[item.storage_index.fqn])
            if item.type == LoadItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(build(self.leaves[item.storage_index.fqn], _no_tensor), buf)
                buf.seek(0)
                planner.load_bytes(item, buf)
                continue
            dest = planner.resolve_tensor(item).detach()
            origin = tuple(a + b for a, b in zip(item.storage_index.offset,
                                                 item.storage_offsets))
            reads.into(payload, dest, origin)
            pending.append((item, dest))
        reads.run(self.paths, self.threads)
        for item, dest in pending:
            planner.commit_tensor(item, dest)
        return _done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True  # folders and fsspec URLs alike


def _no_tensor(key):
    raise UnsupportedValueError(f"tensor {key} inside a non-tensor value")


def _dotted_leaves(node, path=()):
    """``(fqn, node)`` for every leaf, with DCP's dotted names for nested dicts and lists."""
    kind, payload = node_kind(node)
    if kind == "dict":
        for k, v in dict_items(payload):
            yield from _dotted_leaves(v, path + (k,))
    elif kind == "list" and any(node_kind(v)[0] == "tensor" for v in payload):
        for i, v in enumerate(payload):
            yield from _dotted_leaves(v, path + (i,))
    else:
        yield ".".join(str(p) for p in path), node

