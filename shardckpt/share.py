"""Read each byte once on a distributed load: one rank fetches, the others get it over gloo.

Without this, every rank of a DDP job reads the whole checkpoint (N times its size from the
shared file system), every rank reads the manifest, and on a reshard a chunk that overlaps
several new shards is read by each of them. Here:

- ``open_manifest``: rank 0 alone reads ``manifest.json``; its bytes go to every rank by a gloo
  broadcast, and every rank still checks them (CRC-32C, every rule of FORMAT.md 3) itself.
- ``plan`` (the "needs" round of dist.Exchange): every rank posts the chunks its read plan
  names; the coordinator gives each chunk that several ranks need to one of them to read
  (least-loaded, staying on one reader for runs of adjacent chunks). A chunk only one rank needs
  stays in that rank's own read plan (read and decoded straight into place, as before).
- ``fetch_shared``: in rounds of at most ``share_round_bytes``, each reader fetches its chunks'
  stored bytes and one gloo all-to-all hands every rank the ones it needs. Every rank decodes
  what it uses with the native decoder, which verifies each chunk's CRC-32C first: bytes from a
  peer are data only, checked like bytes from disk, never unpickled.

A rank that dies mid-share breaks the gloo collective (or lets it time out after the load's
timeout) on the others; they report ``ShareLostError`` to the load's final round, which then
raises ``RankFailureError`` on every rank naming the silent one.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import torch

from . import codecs, errors, knobs, read, remote_io, tables
from .errors import CheckpointError
from .status import raise_for
from .storage import open_checkpoint

_GROUP: dict = {}  # the gloo group of the current default process group, per timeout
# Errors rank 0 may meet opening the manifest, re-raised as the same type on every rank.
_RELAYED = ("CheckpointNotFoundError", "IncompleteCheckpointError", "CorruptCheckpointError",
            "UnsafeCheckpointError", "StorageError")


class ShareLostError(CheckpointError):
    """A gloo collective of the load's sharing failed: a peer died or timed out."""


def enabled(world: int) -> bool:
    """Whether a load of ``world`` ranks shares its reads (knob ``share_reads``): ``1`` always,
    ``0`` never, ``auto`` when the job spans several nodes. On one node the page cache already
    serves every rank after the first read, and moving the bytes through gloo costs more than
    that (BENCHMARKS.md), so ``auto`` leaves a single-node load alone."""
    mode = str(knobs.get("share_reads")).strip().lower()
    if world <= 1 or mode in ("0", "off", "false"):
        return False
    if mode in ("1", "on", "true"):
        return True
    if mode != "auto":
        raise ValueError(f"SHARDCKPT_SHARE_READS must be auto, 1 or 0, not {mode!r}")
    return nodes(world) > 1


def nodes(world: int) -> int:
    """How many nodes the job spans, as the launcher says (torchrun's LOCAL_WORLD_SIZE, else
    SLURM's node count); 1 when nobody says. Every rank reads the same variables, so every rank
    decides alike."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local and local.isdigit() and int(local) > 0:
        return -(-world // int(local))
    slurm = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or ""
    return int(slurm) if slurm.isdigit() and int(slurm) > 0 else 1


def group(timeout: float):
    """A gloo process group over every rank (created once per default group and timeout): it
    carries host bytes whatever backend the training uses, and gives up after ``timeout``."""
    import torch.distributed as dist
    world = dist.group.WORLD
    cached = _GROUP.get(timeout)
    if cached is None or cached[0] is not world:
        g = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        cached = _GROUP[timeout] = (world, g)
    return cached[1]


def forget() -> None:
    """Drop the cached gloo group. Called on every rank of a failed shared load (the ranks
    raise in the same round, so all of them make a new group for the next load together): a
    group whose peer died is never reused."""
    _GROUP.clear()


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # gloo: connection closed by a dead peer, or a timeout
        raise ShareLostError(f"sharing {what} over gloo failed: {exc}") from exc


def open_manifest(path, storage_options, rank: int, timeout: float):
    """``(manifest, paths)`` as ``read.open_for_read`` gives them, the manifest's bytes read by
    rank 0 only and broadcast, and each data file checked only once this rank uses it
    (``read.LazySources``). Rank 0's failure to read it is raised on every rank as the same
    type (with its message); each rank parses and checks the bytes it received."""
    import torch.distributed as dist
    g = group(timeout)
    storage, name = open_checkpoint(path, storage_options)
    data, failure = None, None
    if rank == 0:
        try:
            data = read.manifest_bytes(storage, name)
        except Exception as exc:  # any failure: the others wait in the broadcast below
            failure = exc
    head = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64)
    _collective("the manifest size", dist.broadcast, head, 0, group=g)
    if head.item() < 0:
        text = f"{type(failure).__name__}\0{failure}" if failure is not None else ""
        buf = _bytes_tensor(text.encode()[:4096])
        size = torch.tensor([len(buf)], dtype=torch.int64)
        _collective("the manifest error", dist.broadcast, size, 0, group=g)
        buf = buf if rank == 0 else torch.empty(int(size.item()), dtype=torch.uint8)
        _collective("the manifest error", dist.broadcast, buf, 0, group=g)
        if failure is not None:
            raise failure
        raise _relayed(buf.numpy().tobytes().decode(errors="replace"))
    buf = _bytes_tensor(data) if rank == 0 else torch.empty(int(head.item()), dtype=torch.uint8)
    _collective("the manifest", dist.broadcast, buf, 0, group=g)
    m = read.checked_manifest(storage, name, buf.numpy().tobytes() if rank else data)
    return m, read.LazySources(storage, name, m)


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.empty(0, dtype=torch.uint8)


def _relayed(text: str) -> CheckpointError:
    """Rank 0's manifest failure, on another rank: the same type when it is one of a fixed list
    (the type travels as a name only; nothing is unpickled), with rank 0's message."""
    kind, _, message = text.partition("\0")
    cls = getattr(errors, kind) if kind in _RELAYED else CheckpointError
    message = f"(rank 0) {message}"
    return cls(0, message) if cls is errors.StorageError else cls(message)


def needs(plan) -> dict:
    """This rank's payload for the "needs" round: every chunk its read plan names, as
    ``(file, offset, length)`` rows."""
    rows = sorted({(f, r.ref.offset, r.ref.length) for f, reads in plan.by_file.items()
                   for r in reads})
    return {"need": tables.encode(np.array(rows, np.int64).reshape(-1, 3))}


def assign(payloads: dict[int, dict], stick_bytes: int | None = None) -> dict:
    """The coordinator's decision: each chunk several ranks need, its reader and its needers.

    Returns ``{"chunks": (file, offset, length, reader) rows, "needers": ranks, "counts":
    needers per chunk}`` as tables, chunks in (file, offset) order. A reader is the least-loaded
    needer, except that the previous chunk's reader keeps reading while it is a needer and no
    more than ``stick_bytes`` (default: knob ``upload_part_bytes``; at most half an even share of
    the shared bytes) ahead of the least-loaded one, so runs of adjacent chunks are read as one
    sequential stream.
    """
    stick = knobs.get("upload_part_bytes") if stick_bytes is None else stick_bytes
    parts = []
    for r, p in sorted(payloads.items()):
        rows = tables.decode(p["need"], 3, f"rank {r} needs")
        parts.append(np.hstack([rows, np.full((len(rows), 1), r, np.int64)]))
    allrows = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
    order = np.lexsort((allrows[:, 3], allrows[:, 1], allrows[:, 0]))
    allrows = allrows[order]
    new = np.ones(len(allrows), bool)
    new[1:] = (allrows[1:, 0] != allrows[:-1, 0]) | (allrows[1:, 1] != allrows[:-1, 1])
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(allrows)))
    shared = counts > 1
    load = np.zeros(max(payloads) + 1, np.int64)
    # Never stick past an even share: a small checkpoint is still spread over the ranks.
    stick = min(stick, int(allrows[starts[shared], 2].sum()) // (2 * len(load)))
    readers, needers, prev = [], [], -1
    for s, n in zip(starts[shared], counts[shared]):
        members = allrows[s:s + n, 3]
        length = int(allrows[s, 2])
        best = int(members[np.argmin(load[members])])
        if prev in members and load[prev] - load[best] <= stick:
            best = prev
        load[best] += length
        readers.append(best)
        needers.append(members)
        prev = best
    chunks = np.column_stack([allrows[starts[shared], :3],
                              np.array(readers, np.int64)]).reshape(-1, 4)
    flat = np.concatenate(needers) if needers else np.zeros(0, np.int64)
    return {"chunks": tables.encode(chunks), "needers": tables.encode(flat.reshape(-1, 1)),
            "counts": tables.encode(counts[shared].reshape(-1, 1))}


class SharedPlan:
    """This rank's part of the coordinator's decision, read once from its tables."""

    def __init__(self, decision: dict, rank: int):
        self.chunks = tables.decode(decision["chunks"], 4, "share plan")
        counts = tables.decode(decision["counts"], 1, "share plan")[:, 0]
        flat = tables.decode(decision["needers"], 1, "share plan")[:, 0]
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.needers = flat
        self.rank = rank
        owner = np.repeat(np.arange(len(counts)), counts)
        self.mine = np.zeros(len(counts), bool)  # chunks this rank needs
        self.mine[owner[flat == rank]] = True

    def needed_by(self, c: int) -> np.ndarray:
        return self.needers[self.first[c]:self.first[c + 1]]

    def rounds(self, budget: int):
        """Chunk indices in rounds of at most ``budget`` stored bytes (at least one chunk)."""
        out, size, start = [], 0, 0
        for c, length in enumerate(self.chunks[:, 2]):
            if c > start and size + length > budget:
                out.append(range(start, c))
                start, size = c, 0
            size += int(length)
        if start < len(self.chunks):
            out.append(range(start, len(self.chunks)))
        return out


def take_shared(plan, shared: SharedPlan) -> dict:
    """Remove the shared chunks this rank needs from its own read plan: ``{(file, offset):
    [ChunkRead, ...]}`` to decode from shared bytes instead."""
    keys = {(int(f), int(o)) for f, o in shared.chunks[shared.mine, :2]}
    taken = defaultdict(list)
    for f in list(plan.by_file):
        keep = []
        for r in plan.by_file[f]:
            (taken[(f, r.ref.offset)] if (f, r.ref.offset) in keys else keep).append(r)
        if keep:
            plan.by_file[f] = keep
        else:
            del plan.by_file[f]
    return taken


def fetch(source, offset: int, length: int) -> bytes:
    """``length`` stored bytes at ``offset`` of a data file (a checked real path, or a
    ``remote_io.RemoteFile``)."""
    if isinstance(source, remote_io.RemoteFile):
        data = source.storage.read(source.path, offset, length)
    else:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
    if len(data) != length:
        raise errors.CorruptCheckpointError(f"{length} bytes at {offset} ended early",
                                            file=getattr(source, "rel", str(source)))
    return data


def fetch_shared(plan, shared: SharedPlan, paths: list, world: int, timeout: float,
                 threads: int | None = None) -> int:
    """Read this rank's share of the shared chunks, exchange them, decode what this rank needs
    into place (checksums verified). Returns the stored bytes this rank read from storage."""
    taken = take_shared(plan, shared)
    g = group(timeout)
    budget = int(knobs.get("share_round_bytes"))
    threads = knobs.get("read_threads") if threads is None else threads
    read_bytes, first_error = 0, None
    for chunks in shared.rounds(budget):
        n, error = _round(plan, shared, list(chunks), taken, paths, world, g, threads)
        read_bytes, first_error = read_bytes + n, first_error or error
    if first_error is not None:  # raised only now: every rank takes part in every round
        raise first_error
    return read_bytes


def _fetch_mine(shared: SharedPlan, reading: list[int], paths: list, g) -> dict:
    """The stored bytes of the chunks this rank reads this round. Every rank then learns whether
    any reader failed (one tiny all-reduce), so no rank waits for bytes that will never come."""
    import torch.distributed as dist
    table, got, failure = shared.chunks, {}, None
    try:
        with ThreadPoolExecutor(max(1, min(len(reading), knobs.get("remote_concurrency")))) as p:
            got = dict(zip(reading, p.map(lambda c: fetch(paths[table[c, 0]], int(table[c, 1]),
                                                          int(table[c, 2])), reading)))
    except Exception as exc:  # a storage error, reported on every rank below
        failure = exc
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64)
    _collective("read outcomes", dist.all_reduce, flag, op=dist.ReduceOp.MAX, group=g)
    if failure is not None:
        raise failure
    if flag.item():
        raise ShareLostError("another rank failed to read its share of the shared chunks")
    return got


def _round(plan, shared: SharedPlan, chunks: list[int], taken: dict, paths: list, world: int,
           g, threads: int) -> tuple:
    """One all-to-all: every rank sends each peer the chunks it read that the peer needs.
    Returns ``(bytes read, this rank's decode error or None)``."""
    import torch.distributed as dist
    me, table = shared.rank, shared.chunks
    reading = [c for c in chunks if table[c, 3] == me]
    got = _fetch_mine(shared, reading, paths, g)
    send = [[c for c in reading if d != me and d in shared.needed_by(c)] for d in range(world)]
    recv = [[c for c in chunks if table[c, 3] == s and shared.mine[c]] if s != me else []
            for s in range(world)]
    out_sizes = [int(table[cs, 2].sum()) if cs else 0 for cs in recv]
    inp = np.empty(sum(int(table[cs, 2].sum()) if cs else 0 for cs in send), np.uint8)
    at = 0
    for cs in send:
        for c in cs:
            inp[at:at + table[c, 2]] = np.frombuffer(got[c], np.uint8)
            at += int(table[c, 2])
    out = np.empty(sum(out_sizes), np.uint8)
    _collective("chunks", dist.all_to_all_single, torch.from_numpy(out), torch.from_numpy(inp),
                output_split_sizes=out_sizes,
                input_split_sizes=[int(table[cs, 2].sum()) if cs else 0 for cs in send], group=g)
    positions, at = {}, 0
    for cs in recv:
        for c in cs:
            positions[c] = at
            at += int(table[c, 2])
    error = None
    try:  # a damaged chunk is this rank's error; it still takes part in the later rounds
        for c in (c for c in reading if shared.mine[c]):
            _decode(plan, got[c], [(c, 0)], table, taken, threads)
        if positions:
            _decode(plan, out, sorted(positions.items()), table, taken, threads)
    except CheckpointError as exc:
        error = exc
    return sum(int(table[c, 2]) for c in reading), error


def _decode(plan, data, placed: list[tuple[int, int]], table: np.ndarray, taken: dict,
            threads: int) -> None:
    """Decode chunks lying in ``data`` (``(chunk, position)`` pairs) into their destinations;
    the backend checks each chunk's CRC-32C before it decodes."""
    by_file = defaultdict(list)
    for c, pos in placed:
        f, offset = int(table[c, 0]), int(table[c, 1])
        for r in taken[(f, offset)]:
            by_file[f].append((pos, r))
    for f, reads in by_file.items():
        requests = [(pos,) + read.backend_request(r)[1:] for pos, r in reads]
        status = codecs.backend.decode_chunks(data, plan.m.files[f].path, requests,
                                                   threads)
        raise_for(status, file=plan.m.files[f].path,
                  describe=lambda i, reads=reads: (reads[i][1].tensor, reads[i][1].chunk_index))
