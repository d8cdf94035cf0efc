"""Restore from the local tier: agree on the newest step complete across the nodes, repair each
node's copy from the others' replicas, load (see local.py).

Checksums are checked once, by the load itself: a survey only looks at each node's manifest and
which data files are present with the right size. A load that meets a corrupt file
(CorruptCheckpointError naming it) marks that node's copy of the file bad; the ranks survey again,
fetch the file from a node holding a replica and load again; with no good copy left the step is
skipped (then an older one, then the durable tier).

Only copies recorded with this tier's job count (check.py): a stranger's folder is never a
candidate, never the manifest that wins and never the source of a repair; a node holding one
under the step's name gets this job's copy instead, as a node that has none.
"""

from __future__ import annotations

import os
import warnings
import zlib

import torch

from ...save import RenameCommit
from ...errors import CheckpointError, CorruptCheckpointError, TransferError
from ..layout import step_name
from ...format.opening import open_manifest
from .check import JOB_KEY, recorded_job
from ..verdict import FATAL, OK, agreed_error, try_load
from ...dist.transfer import exchange_files
from ...types import MANIFEST_NAME

CANDIDATES = 8  # newest local steps each node offers to a restore


def _warn(text: str) -> None:
    warnings.warn(f"shardckpt: {text}", stacklevel=4)


def _gather(tier, values: list[int]) -> list[list[int]]:
    """Every rank's list of ints (all of the same length)."""
    if tier.world == 1:
        return [values]
    mine = torch.tensor(values, dtype=torch.int64)
    out = [torch.zeros_like(mine) for _ in range(tier.world)]
    try:
        tier.dist.all_gather(out, mine, group=tier.group)
    except RuntimeError as exc:  # gloo's word for a dead or hung peer
        raise TransferError(f"rank {tier.rank}: a local tier restore round failed: "
                            f"{exc}") from exc
    return [t.tolist() for t in out]


def _candidates(tier, newer_than: int | None) -> list[int]:
    own = _own_steps(tier)[-CANDIDATES:] if tier.leader else []
    rows = _gather(tier, own + [-1] * (CANDIDATES - len(own)))
    found = sorted({s for row in rows for s in row if s >= 0}, reverse=True)
    return [s for s in found if newer_than is None or s > newer_than]


def _own_steps(tier) -> list[int]:
    """This node's committed steps of this job; the others' are named in a warning."""
    found = tier.steps()
    strangers = [s for s in found if not tier.owns(s)]
    if strangers:
        job = recorded_job(tier.storage, step_name(strangers[-1]))
        _warn(f"{tier.dir}: local step(s) {strangers} on node {tier.node} belong to another "
              f"job (the newest: {_job_text(job)}; this job: {_job_text(tier.job)}); ignored")
    return [s for s in found if s not in strangers]


def _check_copy(tier, step: int, bad: set):
    """(manifest crc or -1, the manifest, set of usable file indices) of this node's copy:
    present with the manifest's size and not in ``bad`` (found corrupt by an earlier load).
    Checksums are left to the load."""
    name = step_name(step)
    try:
        data = tier.storage.read(f"{name}/{MANIFEST_NAME}")
        m = open_manifest(tier.storage, name)
    except (OSError, CheckpointError) as exc:
        if tier.storage.exists(name):
            _warn(f"{tier.path(step)}: node {tier.node}'s manifest is unusable "
                  f"({type(exc).__name__}: {exc}); other nodes' copies are tried")
        return -1, None, set()
    if m.metadata.get(JOB_KEY) != tier.job:
        _warn(f"{tier.path(step)}: node {tier.node}'s copy belongs to another job "
              f"({_job_text(m.metadata.get(JOB_KEY))}, this job: {_job_text(tier.job)}); "
              f"ignored")
        return -1, None, set()
    present = {i for i, f in enumerate(m.files) if f.base is None and
               _size(tier.storage.local_path(f"{name}/{f.path}")) == f.size}
    return zlib.crc32(data) & 0x7FFFFFFF, m, present - bad


def _job_text(job) -> str:
    if not isinstance(job, dict):
        return "no job recorded: saved by an older shardckpt or without a manager"
    return f"durable root {job.get('root')!r}, job id {job.get('job')!r}"


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _survey(tier, step: int, bad: set):
    """Which rank (a node's first) holds a good copy of each file of ``step``; None when some
    file has none. Also every rank's good-file flags and manifest crc, the agreed crc, and
    this rank's manifest."""
    crc, m, good = _check_copy(tier, step, bad) if tier.leader else (-1, None, set())
    heads = _gather(tier, [crc, len(m.files) if m is not None else -1])
    holders = [(r, c) for r, (c, _) in enumerate(heads) if c >= 0]
    if not holders:
        return None
    agreed = holders[0][1]
    n_files = heads[holders[0][0]][1]
    mine = [1 if (crc == agreed and i in good) else 0 for i in range(n_files)]
    rows = _gather(tier, mine)
    owner = []
    for i in range(n_files):
        ranks = [r for r, row in enumerate(rows) if row[i]]
        if not ranks:
            _warn(f"skipping local {step_name(step)}: file {i} "
                  f"({m.files[i].path if m else '?'}) has no good copy on any node")
            return None
        owner.append(ranks[0])
    return owner, rows, [c for c, _ in heads], agreed, m


def _repair(tier, step: int, owner: list[int], rows: list[list[int]], crcs: list[int],
            agreed: int, m) -> None:
    """Fetch the files each node lacks from a holder; in the same order on every rank."""
    leaders = sorted({min(r for r, n in enumerate(tier.nodes_of) if n == node)
                      for node in set(tier.nodes_of)})
    manifest_rank = crcs.index(agreed)
    moves = []  # (sender, receiver, file index or -1 for the manifest)
    for leader in leaders:
        if crcs[leader] != agreed:
            moves.append((manifest_rank, leader, -1))
        moves += [(owner[i], leader, i) for i in range(len(owner)) if not rows[leader][i]]
    if not moves:
        return
    m = m if crcs[tier.rank] == agreed else None
    name = step_name(step)
    names = {}
    if m is not None:
        names = {i: f.path for i, f in enumerate(m.files)}
    receiving, fetched = [mv for mv in moves if mv[1] == tier.rank], {}
    tx = None
    if receiving and receiving[0][2] == -1:  # no usable copy here: rebuild it beside
        tx = RenameCommit(tier.storage, name, overwrite=True).begin()
    dest = tier.storage.local_path(tx.tmp if tx else name)
    failed = None  # a receiver's first failure: it still takes part in every later move
    try:
        for sender, receiver, index in moves:
            try:
                if tier.rank == sender:
                    rel = MANIFEST_NAME if index == -1 else names[index]
                    exchange_files(tier.dist, tier.group, tier.storage.local_path(name), [rel],
                                   receiver, None, what=f"restore {name}")
                elif tier.rank == receiver:
                    got = exchange_files(tier.dist, tier.group, dest, [], None, sender, dest,
                                         what=f"restore {name}", discard=failed is not None)
                    if index == -1 and failed is None:
                        m = open_manifest(tier.storage, tx.tmp)
                        names = {i: f.path for i, f in enumerate(m.files)}
                    fetched.setdefault(sender, []).extend(got)
            except CheckpointError as exc:  # e.g. DiskFullError: the others are not told yet
                failed = failed or exc
        if failed is not None:
            raise failed
        for sender, got in fetched.items():
            _warn(f"{tier.path(step)}: fetched {', '.join(got)} from rank {sender} "
                  f"(node {tier.nodes_of[sender]}): missing or corrupt on node {tier.node}")
        if tx is not None:
            manifest = tier.storage.read(f"{tx.tmp}/{MANIFEST_NAME}")
            tier.storage.delete(f"{tx.tmp}/{MANIFEST_NAME}")  # the commit writes it last
            tx.commit(manifest)
    finally:
        if tx is not None:
            tx.close()


def _corrupt_index(tier, step: int, error) -> int:
    """The manifest index of the file a CorruptCheckpointError names, else -1."""
    where = getattr(error, "file", None) if isinstance(error, CorruptCheckpointError) else None
    if not where:
        return -1
    try:
        m = open_manifest(tier.storage, step_name(step))
    except CheckpointError:
        return -1
    return next((i for i, f in enumerate(m.files)
                 if where == f.path or str(where).endswith("/" + f.path)), -1)


def _load_step(tier, state, step: int, load_options: dict) -> bool:
    """Repair and load ``step``, refetching files a load finds corrupt; whether it loaded.
    Collective; raises errors no older checkpoint would cure."""
    bad: set[int] = set()  # this node's files found corrupt (kept by its first rank)
    while True:
        survey = _survey(tier, step, bad)
        if survey is None:
            return False
        error = None
        try:
            _repair(tier, step, *survey)
        except CheckpointError as exc:
            error = exc
        if _gather_any(tier, error is not None):
            _warn(f"skipping local {step_name(step)}: fetching replicas failed: "
                  f"{error or 'on another rank'}")
            return False
        verdict, error = try_load(state, tier.path(step), load_options, local_copy=True)
        rows = _gather(tier, [verdict, _corrupt_index(tier, step, error) if verdict else -1])
        verdict = max(v for v, _ in rows)
        if verdict == OK:
            return True
        if verdict == FATAL:
            raise agreed_error(error, tier.path(step), local_copy=True)
        # Files found corrupt by the ranks of this node: the same set on each of them.
        fresh = {i for r, (v, i) in enumerate(rows)
                 if i >= 0 and tier.nodes_of[r] == tier.node} - bad
        # Ranks that failed naming no file (RankFailureError: another rank's failure) retry
        # with the rest; a round in which no rank names a new file ends the attempts.
        if not _gather_any(tier, bool(fresh)):
            _warn(f"skipping local {step_name(step)}: {type(error).__name__ if error else ''}"
                  f" {error or 'another rank failed'}")
            return False
        if fresh:
            _warn(f"{tier.path(step)}: node {tier.node}'s copy of file(s) {sorted(fresh)} "
                  f"failed its checks ({error or 'on another rank of the node'}); fetching "
                  f"a replica")
        bad |= fresh


def _gather_any(tier, flag: bool) -> bool:
    """Whether ``flag`` holds on some rank (collective)."""
    return bool(max(v for (v,) in _gather(tier, [int(flag)])))


def restore_newest(tier, state, newer_than: int | None, load_options: dict) -> int | None:
    """See ``LocalTier.restore``."""
    if tier.leader:  # a repair killed mid-way: its partial files would block a later save
        for step in tier.steps():
            tier.sweep_receipts(step_name(step))
    for step in _candidates(tier, newer_than):
        if _load_step(tier, state, step, load_options):
            return step
    return None
