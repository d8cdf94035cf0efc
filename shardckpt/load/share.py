"""Read each byte once on a distributed load: one rank fetches, the others get it through shared
memory on its node and over gloo across nodes.

Without this, every rank of a DDP job reads the whole checkpoint (N times its size from the
shared file system), every rank reads the manifest, and on a reshard a chunk that overlaps
several new shards is read by each of them. Here, in a ``Session``:

- the ranks learn who shares a node with whom (launcher's node index plus a host key, one tiny
  gloo all-reduce); the lowest rank of a node is its leader and makes the node's shared-memory
  folder (nodeshm.py);
- ``open_manifest``: each node's leader alone reads ``manifest.json`` and puts its bytes in the
  folder; every rank of the node takes them from there and checks them (CRC-32C, every rule of
  FORMAT.md 3) itself;
- the "needs" round (dist.Exchange, decision by shareplan.assign) gives each chunk several ranks
  need one reader in the job, one receiver on each other node that needs it, and tells every
  needer which local rank's file to take it from;
- ``fetch``: in rounds of at most ``share_round_bytes``, each reader reads its chunks' stored
  bytes straight into a file of the folder, one gloo all-to-all (only in rounds that cross
  nodes) hands each receiver its chunks into its own file, and after one tiny all-reduce every
  rank maps its node's files and decodes what it uses with the native decoder, which verifies
  each chunk's CRC-32C first: shared bytes are data only, checked like bytes from disk.

A rank that dies mid-share breaks the gloo collective (or lets it time out after the load's
timeout) on the others; they report ``ShareLostError`` to the load's final round, which then
raises ``RankFailureError`` on every rank naming the silent one. ``close`` removes the folder
(after a failure, any surviving rank of the node does), and a later leader sweeps a folder whose
leader died.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import codecs, errors, knobs
from . import read
from ..format import opening
from ..dist import nodeshm
from ..dist.groups import forget_shared_group, shared_group
from ..dist.topology import node_index, nodes
from ..errors import CheckpointError
from ..dist.nodeshm import NodeFolder
from .shareplan import SharedPlan, assign, needs, take_shared
from ..codecs.status import raise_for
from ..storage import open_checkpoint

__all__ = ["Session", "SharedPlan", "ShareLostError", "enabled", "forget", "needs", "assign"]

_TOPOLOGY: dict = {}  # per gloo group: (group, node of each rank, pid of each rank)
# Errors a leader may meet opening the manifest, re-raised as the same type on its node.
_RELAYED = ("CheckpointNotFoundError", "IncompleteCheckpointError", "CorruptCheckpointError",
            "UnsafeCheckpointError", "StorageError", "StoragePermissionError",
            "StorageNotADirectoryError")
_MANIFEST = "m"  # the manifest's file in the node folder


class ShareLostError(CheckpointError):
    """A gloo collective of the load's sharing failed: a peer died or timed out."""


def enabled(world: int, path=None) -> bool:
    """Whether a load of ``world`` ranks from ``path`` shares its reads (knob ``share_reads``):
    ``1`` always, ``0`` never, ``auto`` (the default) when the job spans several nodes or the
    checkpoint is in an object store. One node reading a file system needs no sharing: its
    page cache fetches each byte from the device once and serves every rank after that, faster
    than handing the bytes over through shared memory (BENCHMARKS.md). Every rank reads the same
    variables and path, so every rank decides alike."""
    mode = str(knobs.get("share_reads")).strip().lower()
    if mode not in ("0", "off", "false", "1", "on", "true", "auto"):
        raise ValueError(f"SHARDCKPT_SHARE_READS must be auto, 1 or 0, not {mode!r}")
    if world <= 1 or mode in ("0", "off", "false"):
        return False
    return mode != "auto" or nodes(world) > 1 or _object_store(path)


def _object_store(path) -> bool:
    """Whether ``path`` is an fsspec URL other than ``file://``: no page cache in front of it."""
    text = os.fspath(path) if path is not None else ""
    return "://" in text and not text.startswith("file://")


def forget() -> None:
    """Drop the cached gloo group and node map. Called on every rank of a failed shared load
    (the ranks raise in the same round, so all of them make a new group for the next load
    together): a group whose peer died is never reused."""
    forget_shared_group()
    _TOPOLOGY.clear()


def _topology(g, rank: int, world: int) -> tuple[np.ndarray, int]:
    """``(node of every rank, pid of this rank's node leader)``, found once per gloo group by
    one all-reduce of (launcher's node index, host key, pid) rows: ranks share a node when
    both agree, so an emulated or misdeclared node never spans two hosts' memory."""
    import torch.distributed as dist
    cached = _TOPOLOGY.get(id(g))
    if cached is None or cached[0] is not g:
        rows = torch.zeros((world, 3), dtype=torch.int64)
        rows[rank] = torch.tensor([node_index(rank, unknown=0), nodeshm.host_key(),
                                   os.getpid()])
        _collective("the node map", dist.all_reduce, rows, group=g)  # an all-gather
        ids: dict = {}
        node = np.array([ids.setdefault(k, len(ids)) for k in map(tuple, rows[:, :2].tolist())],
                        np.int64)
        pids = rows[:, 2].numpy().copy()
        cached = _TOPOLOGY[id(g)] = (g, node, pids)
    _, node, pids = cached
    return node, int(pids[np.flatnonzero(node == node[rank])[0]])


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # gloo: connection closed by a dead peer, or a timeout
        raise ShareLostError(f"sharing {what} over gloo failed: {exc}") from exc


def _flag(what: str, failure: BaseException | None, g) -> None:
    """Every rank says whether it failed (one tiny all-reduce); this rank raises its own
    failure, the others ``ShareLostError``, so that no rank waits for bytes that never come."""
    import torch.distributed as dist
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64)
    _collective(what, dist.all_reduce, flag, op=dist.ReduceOp.MAX, group=g)
    if failure is not None:
        raise failure
    if flag.item():
        raise ShareLostError(f"another rank failed while {what}")


class Session:
    """One shared load on this rank: its node's ranks, their folder, the gloo group.

    Every rank creates one per shared load, in the same order, and calls ``open_manifest``,
    ``fetch`` (when the "needs" round succeeded) and ``close``.
    """

    def __init__(self, rank: int, world: int, timeout: float):
        self.rank, self.world, self.timeout = rank, world, timeout
        self.g = shared_group(timeout)
        self.folder: NodeFolder | None = None
        self.node, self.leader_pid = _topology(self.g, rank, world)
        self.local = np.flatnonzero(self.node == self.node[rank])
        self.leader = int(self.local[0])
        self.leader_token = 0  # names the node's folder with the leader's pid; open_manifest

    def assign(self, payloads: dict) -> dict:
        """The coordinator's decision for the "needs" round (shareplan.assign, with nodes)."""
        return assign(payloads, self.node)

    def open_manifest(self, path, storage_options):
        """``(manifest, paths)`` as ``opening.open_for_read`` gives them, the manifest's bytes read
        by the node's leader only, and each data file checked only once this rank uses it
        (``opening.LazySources``). The leader's failure to read it is raised on every rank of its
        node as the same type (with its message); each rank parses and checks the bytes."""
        import torch.distributed as dist
        storage, name = open_checkpoint(path, storage_options)
        data, failure, status = None, None, torch.zeros((self.world, 2), dtype=torch.int64)
        if self.rank == self.leader:
            try:
                data = opening.manifest_bytes(storage, name)
            except Exception as exc:  # any failure: the node's ranks wait in the reduce below
                failure = exc
            posted = self._post_manifest(data, failure)
            status[self.rank] = torch.tensor([posted, self.folder.token if self.folder else 0])
        _collective("the manifest", dist.all_reduce, status, group=self.g)
        if self.rank != self.leader:
            # The leader's random token names its folder: only the node's ranks learn it.
            self.leader_token = int(status[self.leader, 1])
            data = self._take_manifest(int(status[self.leader, 0]))
        elif failure is not None:
            raise failure
        m = opening.checked_manifest(storage, name, data)
        return m, opening.LazySources(storage, name, m)

    def _post_manifest(self, data: bytes | None, failure) -> int:
        """The leader puts the manifest (or its failure) in the node folder; the status the
        others read: ``len + 1``, ``-(len + 1)`` for a failure's text, 0 when it could not."""
        if len(self.local) == 1:
            return 1
        payload = data if failure is None else \
            f"{type(failure).__name__}\0{failure}".encode()[:4096]
        try:
            self.folder = NodeFolder.create(self.leader_pid)
            fd = self.folder.create_file(_MANIFEST, len(payload), allocate_from=len(payload))
            try:
                nodeshm.write_all(fd, payload, 0)
            finally:
                os.close(fd)
        except CheckpointError:
            return 0
        return len(payload) + 1 if failure is None else -(len(payload) + 1)

    def _take_manifest(self, status: int) -> bytes:
        """A local rank's copy of the manifest bytes its leader posted (or its failure)."""
        if status == 0:
            raise errors.StorageError(0, f"rank {self.leader} could not share the manifest "
                                         f"through {nodeshm.base_dir()}")
        self.folder = NodeFolder.attach(self.leader_pid, self.leader_token)
        data = self.folder.read_file(_MANIFEST, abs(status) - 1)
        if status < 0:
            raise _relayed(data.decode(errors="replace"), self.leader)
        return data

    def fetch(self, plan, shared: SharedPlan, paths: list, threads: int | None = None) -> int:
        """Read this rank's share of the shared chunks, hand them on, decode what this rank
        needs into place (checksums verified). Returns the stored bytes it read from storage."""
        if self.folder is not None:
            self.folder.unlink(_MANIFEST)  # every rank took it before posting its needs
        taken = take_shared(plan, shared)
        budget = int(knobs.get("share_round_bytes"))
        threads = knobs.get("read_threads") if threads is None else threads
        read_bytes, first_error, previous = 0, None, None
        for k, chunks in enumerate(shared.rounds(budget)):
            n, error = self._round(k, plan, shared, list(chunks), taken, paths, threads,
                                   previous)
            read_bytes, first_error, previous = read_bytes + n, first_error or error, k
        if first_error is not None:  # raised only now: every rank takes part in every round
            raise first_error
        return read_bytes

    def close(self, failed: bool = False) -> None:
        """End of the load (after its last round, so every local rank is done with the folder):
        remove this rank's files and, from the leader or after a failure, the folder."""
        if self.folder is not None:
            self.folder.remove_all() if failed else self.folder.remove()
            self.folder = None

    def _hold(self, k: int, size: int, pos: dict, reading: list[int], table, paths):
        """This round's holding buffer with the chunks this rank reads in place: a file of the
        node folder that local ranks map (filled by the kernel from a local data file, no copy
        through this process), else plain memory. ``(numpy view, mapping or None)``."""
        if self.folder is None or not size:
            buf = np.empty(size, np.uint8)
            _read_runs(_runs(reading, pos, table), paths, lambda: None, buf)
            return buf, None
        name = f"r{k}-{self.rank}"
        # Read chunks are written into the file (sendfile, pwrite); received ones, after
        # them, land through the mapping (all-to-all): only those are allocated ahead.
        read_end = sum(int(table[c, 2]) for c in reading)
        fd = self.folder.create_file(name, size, allocate_from=read_end)
        try:
            _read_runs(_runs(reading, pos, table), paths, lambda: self.folder.open_written(name),
                       None)
            mapped = nodeshm.map_fd(fd, size, write=True)
        finally:
            os.close(fd)
        return np.frombuffer(mapped, np.uint8), mapped

    def _round(self, k, plan, shared, chunks, taken, paths, threads, previous) -> tuple:
        """One round. Returns ``(bytes read, this rank's decode error or None)``."""
        me, table = self.rank, shared.chunks
        lay = _Layout(shared, chunks)
        pos, size = lay.positions(me)
        reading = [c for c in chunks if table[c, 3] == me]
        failure, buf, mapped = None, np.empty(0, np.uint8), None
        try:
            buf, mapped = self._hold(k, size, pos, reading, table, paths)
        except Exception as exc:  # a storage error, reported on every rank below
            failure = exc
        if lay.cross:
            _flag("reading its share of the shared chunks", failure, self.g)
            self._send(lay, buf, pos, reading)
        _flag("handing on its shared chunks", None if lay.cross else failure, self.g)
        if previous is not None and self.folder is not None:
            # Every local rank mapped round `previous`'s files before joining this flag.
            self.folder.unlink(f"r{previous}-{me}")
        error = None
        try:  # a damaged chunk is this rank's error; it still takes part in the later rounds
            self._decode_mine(k, plan, shared, lay, buf, pos, chunks, taken, threads)
        except CheckpointError as exc:
            error = exc
        del buf
        nodeshm.close(mapped)
        return sum(int(table[c, 2]) for c in reading), error

    def _send(self, lay: "_Layout", buf: np.ndarray, pos: dict, reading: list[int]) -> None:
        """The all-to-all of a round that crosses nodes: each reader sends every receiver its
        chunks, which land straight in the receiver's holding buffer."""
        import torch.distributed as dist
        table, me = lay.table, self.rank
        send = [[c for c in reading if d in lay.recv[c]] if d != me else []
                for d in range(self.world)]
        mine = lay.received(me)
        recv = [[c for c in mine if table[c, 3] == s] for s in range(self.world)]
        in_sizes = [int(sum(int(table[c, 2]) for c in cs)) for cs in send]
        out_sizes = [int(sum(int(table[c, 2]) for c in cs)) for cs in recv]
        inp, at = np.empty(sum(in_sizes), np.uint8), 0
        for cs in send:
            for c in cs:
                n = int(table[c, 2])
                inp[at:at + n] = buf[pos[c]:pos[c] + n]
                at += n
        start = pos[mine[0]] if mine else len(buf)
        out = buf[start:start + sum(out_sizes)]
        _collective("chunks", dist.all_to_all_single, torch.from_numpy(out),
                    torch.from_numpy(inp), output_split_sizes=out_sizes,
                    input_split_sizes=in_sizes, group=self.g)

    def _decode_mine(self, k, plan, shared, lay, buf, pos, chunks, taken, threads) -> None:
        """Decode every chunk of the round this rank needs, from its own buffer or from the
        file of the local rank that holds it."""
        me, by_source = self.rank, {}
        for c in chunks:
            if shared.mine[c]:
                n, s = shared.entries(c)
                by_source.setdefault(int(s[n == me][0]), []).append(c)
        for source, cs in sorted(by_source.items()):
            if source == me:
                _decode(plan, buf, [(c, pos[c]) for c in cs], lay.table, taken, threads)
                continue
            if self.folder is None or self.node[source] != self.node[me]:
                raise ShareLostError(f"the share plan sends rank {me} to rank {source}'s "
                                     "memory, which is not on its node")
            where, size = lay.positions(source)
            mapped = self.folder.map_file(f"r{k}-{source}", size)
            try:
                _decode(plan, mapped, [(c, where[c]) for c in cs], lay.table, taken, threads)
            finally:
                nodeshm.close(mapped)


class _Layout:
    """Which rank holds which chunk of a round, and where in its buffer: the chunks it reads
    (in order), then those it receives (by reader, then in order). Alike on every rank."""

    def __init__(self, shared: SharedPlan, chunks: list[int]):
        self.table, self.chunks = shared.chunks, chunks
        self.recv = {c: shared.receivers(c) for c in chunks}
        self.cross = any(self.recv.values())

    def received(self, h: int) -> list[int]:
        return sorted((c for c in self.chunks if h in self.recv[c]),
                      key=lambda c: (int(self.table[c, 3]), c))

    def positions(self, h: int) -> tuple[dict, int]:
        """``({chunk: position}, size)`` of rank ``h``'s holding buffer."""
        held = [c for c in self.chunks if self.table[c, 3] == h] + self.received(h)
        pos, at = {}, 0
        for c in held:
            pos[c] = at
            at += int(self.table[c, 2])
        return pos, at


def _runs(reading: list[int], pos: dict, table) -> list[tuple]:
    """The chunks this rank reads as ``(file, offset, length, position)`` runs, adjacent chunks
    (next in the data file and in the buffer) merged into one read."""
    runs: list[list] = []
    for c in reading:
        f, offset, length = (int(v) for v in table[c, :3])
        last = runs[-1] if runs else None
        if last and last[0] == f and last[1] + last[2] == offset and last[3] + last[2] == pos[c]:
            last[2] += length
        else:
            runs.append([f, offset, length, pos[c]])
    return [tuple(r) for r in runs]


def _read_runs(runs: list[tuple], paths, out_fd, buf) -> None:
    """Read each run of stored bytes into ``buf`` (memory) or, with ``buf`` None, into the file
    ``out_fd()`` opens for each run (its own file position), at its position; runs in
    parallel."""
    if not runs:
        return
    view = None if buf is None else memoryview(buf)

    def one(run):
        f, offset, length, at = run
        if view is not None:
            fetch(paths[f], offset, length, view[at:at + length])
        else:
            fd = out_fd()
            try:
                fetch_to_file(paths[f], offset, length, fd, at)
            finally:
                os.close(fd)

    with ThreadPoolExecutor(max(1, min(len(runs), knobs.get("remote_concurrency")))) as pool:
        list(pool.map(one, runs))


def fetch(source, offset: int, length: int, out: memoryview) -> None:
    """Read ``length`` stored bytes at ``offset`` of a data file (a checked real path, or a
    ``opening.RemoteFile``) into ``out``."""
    label = getattr(source, "rel", str(source))
    if isinstance(source, opening.RemoteFile):
        data = source.storage.read(source.path, offset, length)
        got = min(len(data), length)
        out[:got] = data[:got]
    else:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            got = 0
            while got < length:
                n = os.preadv(fd, [out[got:]], offset + got)
                if n <= 0:
                    break
                got += n
        except OSError as exc:
            raise errors.StorageError(exc.errno or 0, f"{label}: {exc}") from exc
        finally:
            os.close(fd)
    _check_length(got, length, offset, label)


def fetch_to_file(source, offset: int, length: int, out_fd: int, at: int) -> None:
    """Copy ``length`` stored bytes at ``offset`` of a data file into the share file ``out_fd``
    at ``at``: in the kernel for a local file (``sendfile``), through
    memory for a remote one."""
    label = getattr(source, "rel", str(source))
    if isinstance(source, opening.RemoteFile):
        data = source.storage.read(source.path, offset, length)
        nodeshm.write_all(out_fd, data[:length], at)
        _check_length(len(data), length, offset, label)
        return
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        got = nodeshm.copy_range(fd, offset, out_fd, at, length)
    except OSError as exc:
        raise errors.StorageError(exc.errno or 0, f"{label}: {exc}") from exc
    finally:
        os.close(fd)
    _check_length(got, length, offset, label)


def _check_length(got: int, length: int, offset: int, label: str) -> None:
    if got != length:
        raise errors.CorruptCheckpointError(f"{length} bytes at {offset} ended early",
                                            file=label)


def _relayed(text: str, leader: int) -> CheckpointError:
    """The leader's manifest failure, on another rank of its node: the same type when it is one
    of a fixed list (the type travels as a name only; nothing is unpickled), with its message."""
    kind, _, message = text.partition("\0")
    cls = getattr(errors, kind) if kind in _RELAYED else CheckpointError
    message = f"(rank {leader}) {message}"
    return cls(0, message) if issubclass(cls, errors.StorageError) else cls(message)


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
