"""``WandbCheckpoints``: each committed checkpoint as a W&B reference artifact version.

    import wandb, shardckpt
    from shardckpt.integrations.wandb import WandbCheckpoints
    run = wandb.init(project="llm")                 # WANDB_MODE=offline works the same
    mgr = shardckpt.CheckpointManager("ckpt", every_n_steps=500, keep_last=3, keep_best=1,
                                      monitor="val_loss", on_event=WandbCheckpoints())
    ...
    path = WandbCheckpoints.resolve("llm/checkpoints-<run id>:best")  # for shardckpt.load

Each checkpoint is a version of the artifact ``checkpoints-<run id>`` (type
``shardckpt-checkpoint``) that *references* its folder (``Artifact.add_reference`` with
``checksum=False``: the folder is listed, its files' sizes recorded, nothing read or uploaded)
plus its manifest with an MD5 checksum (the manifest's CRC-32C covers every chunk). The
version's metadata is the checkpoint's record (URI, step, epoch, metrics, kind, bytes, the
manifest's CRC-32C, state); its aliases are ``step-N``, ``latest`` and ``best``. W&B keeps one
version per distinct content, so logging a checkpoint again only moves aliases to it.

A removed checkpoint: online, its version loses its aliases and gets ``state: removed`` in its
metadata (through ``wandb.Api``); in an offline run the run summary's
``shardckpt/removed_steps`` lists it (``resolve`` of an offline run honours it) and ``best``
moves to the best one left. Needs ``pip install 'shardckpt[wandb]'``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib
from pathlib import Path

from . import require
from .trackers import CheckpointRecord, TrackerCallback, as_error
from ..errors import TrackerError

_wandb = require("wandb", "wandb", "WandbCheckpoints")

__all__ = ["WandbCheckpoints", "ARTIFACT_TYPE", "REMOVED_KEY"]

ARTIFACT_TYPE = "shardckpt-checkpoint"
REMOVED_KEY = "shardckpt/removed_steps"  # run summary key: steps removed by retention
MAX_FILES = 1_000_000  # add_reference lists at most this many files of one folder


def _file_uri(uri: str) -> str | None:
    """``file://`` URI of a local folder (None for an object-store URL)."""
    return None if "://" in uri else Path(uri).resolve().as_uri()


class WandbCheckpoints(TrackerCallback):
    """Register each committed checkpoint in a W&B run as a reference artifact (an ``on_event``).

    Args:
        run: the run (default: the active ``wandb.run``).
        name: the artifact's name (default ``checkpoints-<run id>``).
        copy: add the checkpoint's files to the artifact (uploaded at sync; local folders
            only) instead of referencing them.
        **options: ``monitor``, ``mode``, ``rank0_only``, ``retry_max_seconds``,
            ``storage_options`` (see ``TrackerCallback``).

    Raises:
        TrackerError: no ``run`` and no active run (``wandb.init()`` first).
    """

    def __init__(self, run=None, *, name: str | None = None, copy: bool = False, **options):
        super().__init__(**options)
        run = run if run is not None else _wandb.run
        if run is None:
            raise TrackerError("WandbCheckpoints: no active W&B run; call wandb.init() "
                               "first or pass run=")
        self.run, self.copy = run, copy
        self.name = name or f"checkpoints-{run.id}"
        self.removed_steps: list[int] = []

    # ------------------------------------------------------------ registration (worker)
    def _artifact(self, record: CheckpointRecord):
        meta = {k: v for k, v in record.as_dict().items() if k != "aliases"}
        artifact = _wandb.Artifact(self.name, type=ARTIFACT_TYPE, metadata=meta)
        folder = os.path.basename(record.uri.rstrip("/"))
        local = _file_uri(record.uri)
        if self.copy:
            if local is None:
                raise TrackerError(f"WandbCheckpoints(copy=True) adds local folders only, "
                                   f"not {record.uri}")
            artifact.add_dir(record.uri, name=folder)
            return artifact
        ref = local or record.uri
        artifact.add_reference(ref, name=folder, checksum=False, max_objects=MAX_FILES)
        if local is not None:  # the small manifest's checksum tells versions apart
            artifact.add_reference(f"{local}/manifest.json", name="manifest.json")
        return artifact

    def _log(self, record: CheckpointRecord, aliases: list[str]) -> None:
        local = _file_uri(record.uri)
        if local is not None and not os.path.isdir(record.uri):
            return  # removed meanwhile: its removal event is queued behind this one
        aliases = [f"step-{record.step}"] + [a for a in aliases if a != "latest"]
        self.run.log_artifact(self._artifact(record), aliases=aliases)

    def _commit(self, record: CheckpointRecord) -> None:
        self._log(record, record.aliases)

    def _relog_latest(self, record: CheckpointRecord) -> None:
        """W&B gives ``latest`` to the version logged last: after logging an older
        checkpoint again, log the newest once more (the same content: no new version)."""
        latest = self.records.get(self.aliases.get("latest"))
        if latest is not None and latest is not record:
            self._log(latest, latest.aliases)

    def _remove(self, record: CheckpointRecord) -> None:
        if record.step not in self.removed_steps:
            self.removed_steps.append(record.step)
        self.run.summary[REMOVED_KEY] = sorted(self.removed_steps)
        if not self.run.offline:
            self._api_remove(record)

    def _api_remove(self, record: CheckpointRecord) -> None:
        """Online: drop the version's aliases and mark its metadata (the files are gone)."""
        api = _wandb.Api()
        version = api.artifact(f"{self.run.entity}/{self.run.project}/{self.name}:"
                               f"step-{record.step}")
        version.metadata = {**version.metadata, "state": "removed"}
        version.aliases = []
        version.save()

    def _demote(self, record: CheckpointRecord) -> None:
        self._log(record, record.aliases)  # new content (a smaller manifest): a new version
        self._relog_latest(record)

    def _drop_alias(self, alias: str, old: CheckpointRecord) -> None:
        """Nothing to do: a W&B alias leaves its old version when another version takes it."""

    def _move_alias(self, alias: str, old: CheckpointRecord | None,
                    new: CheckpointRecord | None) -> None:
        if new is None:
            return  # no version to carry it; a removed holder is marked by _remove
        self._log(new, new.aliases + [alias])
        self._relog_latest(new)

    # ------------------------------------------------------------ loading
    @staticmethod
    def resolve(spec: str, offline_dir: str | None = None) -> str:
        """The URI of a registered checkpoint, ready for ``shardckpt.load``.

        Args:
            spec: ``"project/name:alias"`` (or ``"entity/project/name:alias"``); the alias is
                ``latest``, ``best`` or ``step-N``.
            offline_dir: read the offline runs under this folder (the ``dir`` given to
                ``wandb.init``, or its ``wandb`` subfolder) instead of asking the W&B server.

        Returns:
            the checkpoint folder's path or URL.

        Raises:
            CheckpointNotFoundError: no such artifact or alias, or the checkpoint was removed.
        """
        if offline_dir is not None:
            return _offline_resolve(spec, offline_dir)
        try:
            version = _wandb.Api().artifact(spec)
        except _wandb.errors.CommError as exc:
            raise as_error(f"W&B has no checkpoint {spec}: {exc}") from exc
        if version.metadata.get("state") == "removed":
            raise as_error(f"W&B checkpoint {spec} ({version.metadata.get('uri')}) was "
                           "removed by retention")
        return version.metadata["uri"]


# ---------------------------------------------------------------- offline runs
def _split_spec(spec: str) -> tuple[str | None, str, str]:
    """``(project, name, alias)`` of ``[entity/]project/name:alias`` (project may be absent)."""
    path, _, alias = spec.rpartition(":")
    if not path or not alias:
        raise ValueError(f"{spec!r} is not 'project/name:alias'")
    parts = path.split("/")
    return (parts[-2] if len(parts) > 1 else None), parts[-1], alias


def _offline_resolve(spec: str, folder: str, wait: float = 5.0) -> str:
    """Replay the artifact and summary records of the offline runs under ``folder``. W&B's
    service process writes a run's file a moment after ``finish()`` returns: while a run file
    has no exit record and nothing is found, look again for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        found, removed, open_runs = _scan(spec, folder)
        if found is not None or not open_runs or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if found is None:
        raise as_error(f"no offline W&B run under {folder} logged {spec}")
    if found.get("step") in removed:
        raise as_error(f"W&B checkpoint {spec} ({found.get('uri')}) was removed by retention")
    return found["uri"]


def _scan(spec: str, folder: str) -> tuple[dict | None, set, int]:
    """(the metadata of the last version logged with the alias, the removed steps, how many
    runs have no exit record yet) over the offline runs under ``folder``."""
    project, name, alias = _split_spec(spec)
    found, removed, open_runs = None, set(), 0
    for path in sorted(glob.glob(os.path.join(folder, "offline-run-*", "run-*.wandb")) +
                       glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))):
        run_project, ended = None, False
        for record in run_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_project = record.run.project
            elif kind == "exit":
                ended = True
            elif kind == "artifact" and record.artifact.name == name and \
                    project in (None, run_project) and alias in record.artifact.aliases:
                found = json.loads(record.artifact.metadata or "{}")
            elif kind == "summary":
                for item in record.summary.update:
                    if item.key == REMOVED_KEY:
                        removed.update(json.loads(item.value_json))
        open_runs += not ended
    return found, removed, open_runs


_BLOCK, _HEADER = 32768, 7  # the leveldb log format W&B writes run files in


def run_records(path: str):
    """The records (``wandb_internal_pb2.Record``) of a run's ``.wandb`` file, in order.

    W&B 0.31 ships no reader of its own; the format is leveldb's log: a 7-byte file header
    (``:W&B``, magic, version), then 32 KiB blocks of chunks, each ``crc32 (4) length (2)
    type (1)`` then the data; a record spans FIRST, MIDDLE... LAST chunks or is one FULL chunk.
    A chunk whose checksum fails ends the replay (a run still being written).
    """
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise TrackerError(f"{path}: not a W&B run file")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc or kind not in (1, 2, 3, 4):
            return
        parts = [chunk] if kind in (1, 2) else parts + [chunk]
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            yield record
