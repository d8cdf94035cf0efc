"""What the experiment-tracker callbacks share: a record of each committed checkpoint, read from
its manifest, and a background worker that registers it without ever stalling a save.

``MLflowCheckpoints`` (mlflow.py) and ``WandbCheckpoints`` (wandb.py) are ``on_event`` callbacks
of ``CheckpointManager``. The callback itself only queues the event; one daemon thread per
callback reads the manifest and talks to the tracker, in event order (so ``latest`` ends on the
newest commit). A tracker that is down or refuses a call is retried with a growing delay and a
WARNING line per failure; the checkpoint is committed either way, and nothing of its data is
read beyond the manifest.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field

from ..errors import CheckpointError, CheckpointNotFoundError, StorageError, TrackerError
from ..format.chunk_index import unbundle
from ..format.opening import checked_manifest, manifest_bytes
from ..manage.manager import META_KEY
from ..manage.retention import best_steps
from ..manage.rootinfo import read_info
from ..observe import DEMOTED, REMOVED, SAVE_COMMITTED, CheckpointEvent, logger
from ..storage import open_checkpoint
from ..types import MANIFEST_NAME

HANDLED = (SAVE_COMMITTED, REMOVED, DEMOTED)
EXIT_FLUSH_SECONDS = 10.0  # at interpreter exit, the wait for what is still queued
_STOP = object()


@dataclass
class CheckpointRecord:
    """What a tracker records about one checkpoint (by reference: nothing of its data).

    Attributes:
        uri: the checkpoint folder (a local path or an object-store URL), ready for ``load``.
        step, epoch, metrics, reason: from the manager's metadata in the manifest.
        kind: ``full``, ``weights`` (demoted) or ``incremental`` (references a base).
        bytes_written: bytes of the data files in the folder itself.
        bytes_referenced: bytes of the files it references in older checkpoints.
        manifest_crc32c: the manifest's own checksum (FORMAT.md 3), which covers every chunk's.
        state: ``kept``, ``demoted`` or ``removed``.
    """

    uri: str
    step: int | None
    epoch: float | int | None = None
    metrics: dict | None = None
    reason: str | None = None
    kind: str = "full"
    bytes_written: int = 0
    bytes_referenced: int = 0
    manifest_crc32c: int | None = None
    state: str = "kept"
    aliases: list = field(default_factory=list)

    def as_dict(self) -> dict:
        """A JSON-ready copy (tracker metadata)."""
        return asdict(self)


def read_record(path: str, step: int | None, storage_options: dict | None = None
                ) -> CheckpointRecord:
    """The record of the committed checkpoint at ``path``, from its manifest alone.

    Raises:
        CheckpointNotFoundError: the checkpoint is gone (removed before it was registered).
        CheckpointError: the manifest cannot be read or fails its checks.
    """
    if "://" not in path:  # a tracker outlives the working directory
        path = os.path.abspath(path)
    storage, name = open_checkpoint(path, storage_options)
    data = manifest_bytes(storage, name)
    manifest = checked_manifest(storage, name, data)
    metadata = manifest.metadata or {}
    # the manager's facts; a Lightning checkpoint (integrations/lightning.py) has its own
    meta = metadata.get(META_KEY) or {}
    lightning = metadata.get("lightning") or {}
    if not meta and lightning:
        meta = {"step": lightning.get("global_step", step), "epoch": lightning.get("epoch")}
    written = sum(f.size for f in manifest.files if f.base is None) + \
        sum(e.size for e in manifest.indexes or ())
    referenced = sum(f.size for f in manifest.files if f.base is not None)
    kind = meta.get("kind") or ("incremental" if referenced else "full")
    return CheckpointRecord(
        uri=path, step=meta.get("step", step), epoch=meta.get("epoch"),
        metrics=meta.get("metrics"), reason=meta.get("reason"), kind=kind,
        bytes_written=written, bytes_referenced=referenced,
        manifest_crc32c=manifest_crc(data))


def manifest_crc(data: bytes) -> int:
    """The manifest's own CRC-32C (its last member, FORMAT.md 3), from ``manifest_bytes``
    (which may carry the index files after it: chunk_index.bundle); already checked."""
    text, _ = unbundle(data)
    return int(text.rsplit(b',"manifest_crc32c":', 1)[1].rstrip().rstrip(b"}"))


def _same(uri: str, path: str) -> bool:
    """Whether an event's ``path`` names the registered ``uri`` (a framework may write one
    step twice, as Lightning's top-k file and ``last``: removing one leaves the other)."""
    return uri == (path if "://" in path else os.path.abspath(path))


def _rank0() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TrackerCallback:
    """Base of the tracker callbacks: queue on the caller's thread, register on a worker.

    Subclasses implement ``_commit(record)`` (register it holding ``record.aliases``),
    ``_remove(record)``, ``_demote(record)``, ``_drop_alias(alias, old)`` (a new commit took
    the alias) and ``_move_alias(alias, old, new)`` (records or None); each must be safe to
    call again after it failed part way (the worker retries the whole event).

    Args:
        monitor, mode: the metric that ranks ``best`` and its direction (default: the
            manager's, read from its root's ``.manager.json``; no monitor: no ``best``).
        rank0_only: register on rank 0 only (every rank sees the same events).
        retry_max_seconds: the longest wait between two tries of a failing registration.
        storage_options: for reading manifests on object stores.
    """

    def __init__(self, *, monitor: str | None = None, mode: str | None = None,
                 rank0_only: bool = True, retry_max_seconds: float = 30.0,
                 storage_options: dict | None = None):
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.rank0_only = rank0_only
        self.retry_max_seconds = retry_max_seconds
        self.storage_options = storage_options
        self.records: dict[int, CheckpointRecord] = {}  # step -> record (kept and demoted)
        self.aliases: dict[str, int] = {}  # alias -> step
        self.failures = 0  # registration attempts that failed (each was logged)
        self.last_error: Exception | None = None  # the latest of them
        self._info: dict | None = None  # the root's monitor and mode, once read
        self._info_tries = 0
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._exit_hook = False

    # ------------------------------------------------------------ the caller's side
    def __call__(self, event: CheckpointEvent) -> None:
        """Queue ``event`` for registration (returns at once; kinds it does not know pass)."""
        if event.kind not in HANDLED or event.step is None:
            return
        if self.rank0_only and not _rank0():
            return
        with self._idle:
            self._pending += 1
        self._queue.put(event)
        if self._thread is None:  # the first event, or the first since close()
            self._closing.clear()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"shardckpt-{type(self).__name__}")
            self._thread.start()
            if not self._exit_hook:  # a script that never calls close() still registers
                atexit.register(self.close, EXIT_FLUSH_SECONDS)
                self._exit_hook = True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event is registered; whether that happened in ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float | None = 30.0) -> bool:
        """Register what is queued (up to ``timeout`` s), then stop the worker.

        Returns:
            whether everything was registered; what was not is logged as an ERROR.
        """
        done = self.flush(timeout)
        self._closing.set()
        if not done:
            logger.error("shardckpt: %s gave up with %d checkpoint event(s) not registered",
                         type(self).__name__, self._pending)
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(5.0)
            self._thread = None
        return done

    # ------------------------------------------------------------ the worker's side
    def _run(self) -> None:
        while (event := self._queue.get()) is not _STOP:
            delay = 0.5
            while not self._closing.is_set():
                try:
                    self._apply(event)
                    break
                except Exception as exc:  # the tracker is down or refused: try again later
                    if self._gone(event) or self._hopeless(event, exc):
                        break
                    self.failures += 1
                    self.last_error = exc
                    logger.warning("shardckpt: %s could not register %s of %s (%s: %s); "
                                   "retrying in %.1f s", type(self).__name__, event.kind,
                                   event.path, type(exc).__name__, exc, delay)
                    self._closing.wait(delay)
                    delay = min(delay * 2, self.retry_max_seconds)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _hopeless(self, event: CheckpointEvent, exc: Exception) -> bool:
        """Whether trying ``event`` again cannot help: the tracker cannot take it
        (TrackerError) or the checkpoint itself is bad (a CheckpointError that is no storage
        outage). Logged as an ERROR and skipped, so that later events are not held up."""
        if not isinstance(exc, (TrackerError, CheckpointError)) or \
                isinstance(exc, StorageError):
            return False
        self.failures += 1
        self.last_error = exc
        logger.error("shardckpt: %s skips %s of %s: %s: %s", type(self).__name__, event.kind,
                     event.path, type(exc).__name__, exc)
        if event.kind == SAVE_COMMITTED and not self._created(event.step):
            self.records.pop(event.step, None)  # never registered: no alias may land on it
        return True

    def _gone(self, event: CheckpointEvent) -> bool:
        """After a failed commit: whether the checkpoint was removed meanwhile (retention ran
        while the tracker was slow or down), so that nothing is left to register."""
        if event.kind != SAVE_COMMITTED:
            return False
        try:
            storage, name = open_checkpoint(event.path, self.storage_options)
            present = storage.exists(f"{name}/{MANIFEST_NAME}")
        except (OSError, CheckpointError):
            return False
        if not present:
            logger.info("shardckpt: %s was removed before it was registered", event.path)
            if not self._created(event.step):  # else its removal event marks it
                self.records.pop(event.step, None)
        return not present

    def _apply(self, event: CheckpointEvent) -> None:
        if event.kind == SAVE_COMMITTED:
            self._committed(event)
        elif event.step in self.records and _same(self.records[event.step].uri, event.path):
            record = self.records[event.step]
            if event.kind == REMOVED:
                record.state = "removed"
                self._remove(record)
                del self.records[event.step]
                for alias in [a for a, s in self.aliases.items() if s == event.step]:
                    del self.aliases[alias]
            else:  # demoted: the folder now holds the weights only
                fresh = read_record(event.path, event.step, self.storage_options)
                fresh.kind, fresh.state, fresh.aliases = "weights", "demoted", record.aliases
                self.records[event.step] = fresh
                self._demote(fresh)
        self._alias("best", self._best(event.path))

    def _committed(self, event: CheckpointEvent) -> None:
        """Register a new checkpoint holding ``latest`` (and ``best`` when it is the best)."""
        try:
            record = read_record(event.path, event.step, self.storage_options)
        except CheckpointNotFoundError:
            logger.info("shardckpt: %s was removed before it was registered", event.path)
            return
        if record.epoch is None:  # a framework's checkpoint: its integration reports these
            record.epoch = event.epoch
        if record.metrics is None:
            record.metrics = event.metrics
        self.records[event.step] = record
        best = self._best(event.path)
        record.aliases = ["latest"] + (["best"] if best == event.step else [])
        self._commit(record)
        for alias in record.aliases:  # the previous holders let go
            old = self.records.get(self.aliases.get(alias))
            if old is not None and old is not record and alias in old.aliases:
                self._drop_alias(alias, old)
                old.aliases.remove(alias)
            self.aliases[alias] = event.step

    def _alias(self, alias: str, step: int | None) -> None:
        """Point ``alias`` at ``step`` (None: at nothing) in the tracker and in ``aliases``."""
        old = self.records.get(self.aliases.get(alias))
        new = self.records.get(step)
        if old is new:
            return
        self._move_alias(alias, old, new)
        if old is not None and alias in old.aliases:
            old.aliases.remove(alias)
        if new is not None:
            new.aliases.append(alias)
            self.aliases[alias] = step
        else:
            self.aliases.pop(alias, None)

    def _best(self, path: str) -> int | None:
        """The step ``best`` names among the registered checkpoints (None: no monitor)."""
        monitor, mode = self.monitor, self.mode
        if monitor is None:
            info = self._root_info(path)
            monitor, mode = info.get("monitor"), mode or info.get("mode")
        if monitor is None:
            return None
        ranked = best_steps(self.records, {s: r.metrics for s, r in self.records.items()},
                            monitor, mode or "min", 1)
        return ranked[0] if ranked else None

    def _root_info(self, path: str) -> dict:
        """The manager's ``monitor`` and ``mode`` from the root (``{}`` for a folder that no
        manager wrote). The manager records them just after its first commit, so a missing
        file is read again a few times, only until the first one is found."""
        if self._info is not None:
            return self._info
        storage, _ = open_checkpoint(path, self.storage_options)
        for wait in (0.05, 0.1, 0.2, 0.4, 0.0):
            info = read_info(storage)
            if info is not None:
                self._info = info
                return info
            if self._info_tries > 0:
                break
            time.sleep(wait)
        self._info_tries += 1
        return {}

    # ------------------------------------------------------------ per tracker
    def _commit(self, record: CheckpointRecord) -> None:
        raise NotImplementedError

    def _created(self, step: int) -> bool:
        """Whether the tracker holds an entry for ``step`` (even one a failed try left)."""
        return False

    def _remove(self, record: CheckpointRecord) -> None:
        raise NotImplementedError

    def _demote(self, record: CheckpointRecord) -> None:
        raise NotImplementedError

    def _drop_alias(self, alias: str, old: CheckpointRecord) -> None:
        raise NotImplementedError

    def _move_alias(self, alias: str, old: CheckpointRecord | None,
                    new: CheckpointRecord | None) -> None:
        raise NotImplementedError


def as_error(message: str) -> CheckpointError:
    """A CheckpointNotFoundError for resolve (the tracker names no such checkpoint)."""
    return CheckpointNotFoundError(message)
