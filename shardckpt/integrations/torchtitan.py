"""A torchtitan checkpoint backend: the trainer's state saved and loaded as shardckpt checkpoints.

    from shardckpt.integrations.torchtitan import ShardCkptCheckpointManager
    config = Trainer.Config(..., checkpoint=ShardCkptCheckpointManager.Config(
        enable=True, folder="checkpoint", interval=500, keep_latest_k=3))

torchtitan (0.3.0) builds its checkpointer from the trainer config (``config.checkpoint.build``)
and calls ``load`` once, ``save(step)`` after every step, ``maybe_wait_for_staging`` before each
optimizer step and ``close`` at the end; this class answers those calls. A checkpoint is the
shardckpt folder ``<dump_folder>/<folder>/step-N`` (torchtitan's naming) holding
``{"model": ..., "optimizer", "lr_scheduler", "dataloader", "train_state", ...}``. Folders of an
earlier run with torchtitan's DCP backend (a ``.metadata`` file) are discovered and loaded too,
so a run switches backends without starting over. Needs ``pip install 'shardckpt[torchtitan]'``
and ``pip install --no-deps torchtitan==0.3.0`` (docs/torchtitan.md says why).
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass
from typing import Any

from . import require

_base = require("torchtitan.components.checkpointer.base", "torchtitan",
                "ShardCkptCheckpointManager")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torchtitan.config import TORCH_DTYPE_MAP  # noqa: E402
from torchtitan.tools import filesystem  # noqa: E402
from torchtitan.tools.logging import logger  # noqa: E402

from .. import api  # noqa: E402
from ..errors import CheckpointError, StateMismatchError  # noqa: E402
from ..format.opening import open_manifest  # noqa: E402
from ..format.retire import remove_checkpoint  # noqa: E402
from ..format.root import is_committed  # noqa: E402
from ..format.tree import dict_items, node_kind  # noqa: E402
from ..manage.preemption import EXIT_PREEMPTED, PreemptionWatcher  # noqa: E402
from ..manage.tier.local import LocalTier  # noqa: E402
from ..manage.verdict import FATAL, OK, SKIP, is_fatal  # noqa: E402
from ..observe import REMOVED, SAVE_COMMITTED, emit, event_callback  # noqa: E402
from ..save import async_save  # noqa: E402
from ..storage import open_storage  # noqa: E402

__all__ = ["ShardCkptCheckpointManager", "EXIT_PREEMPTED"]

MODEL, OPTIMIZER, LR_SCHEDULER, DATALOADER = (_base.MODEL, _base.OPTIMIZER, _base.LR_SCHEDULER,
                                              _base.DATALOADER)
STEP_DIR = re.compile(r"step-(\d+)")
DCP_METADATA = ".metadata"  # what marks a folder written by torchtitan's DCP backend
META_KEY = "shardckpt.torchtitan"


class ShardCkptCheckpointManager(_base.BaseCheckpointManager):
    """torchtitan's checkpointer contract, answered by shardckpt.

    Args:
        config: this class's ``Config`` (torchtitan's shared fields plus ours).
        dataloader, model_parts, optimizers, lr_schedulers, states, sd_adapter, base_folder:
            what torchtitan's trainer passes to every checkpoint manager.
        on_event: a callable taking ``shardckpt.observe.CheckpointEvent`` (instead of
            ``config.on_event``): ``save_committed`` once each checkpoint commits, on the thread
            that commits it (every rank), ``removed`` for each ``keep_latest_k`` deletion (rank
            0); a callback that raises is logged, never raised.

    Raises:
        ValueError: a config field this backend cannot honour (HF safetensors in or out).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(_base.BaseCheckpointManager.Config):
        """torchtitan's checkpoint fields, plus shardckpt's."""

        async_mode: str = "async"
        """"async" (default; "async_with_pinned_mem" is the same): save in the background,
        the parameters and moments copied during the next forward/backward; "disabled": wait."""
        codec: str = "auto"
        """shardckpt codec: "auto", "zstd" or "raw"."""
        incremental: bool = False
        """Reference chunks the previous checkpoint already stores instead of writing them."""
        full_every: int | None = 10
        """With incremental: every full_every-th save writes every chunk."""
        handle_preemption: bool = True
        """On SIGTERM every rank saves at the next ``save`` call, commits and exits with 75."""
        grace_seconds: float | None = None
        """From the signal, the time allowed to commit before exiting with 76."""
        staging_budget_bytes: int | None = None
        """Host memory an asynchronous save may take (default: shardckpt's)."""
        local_folder: str | None = None
        """Node-local folder of the local tier ("{node}" becomes the node index); None: off."""
        local_interval: int | None = None
        """Save to the local tier every N steps (in the background; skipped while busy)."""
        local_keep: int = 1
        """Local checkpoints each node keeps."""
        local_replicas: int = 1
        """Other nodes that hold a copy of each rank's local data."""
        on_event: str | None = None
        """Events of each commit and removal to a callable (``CheckpointEvent``): its dotted
        import path ("shardckpt.integrations.wandb.WandbCheckpoints": a class is constructed
        without arguments), or in a Python config the callable itself."""
        local_on_busy: str = "skip"
        """A local step while the previous local save runs: "skip" it (a counted warning) or
        "wait" for that save."""

        def __post_init__(self) -> None:
            _base.BaseCheckpointManager.Config.__post_init__(self)
            self.async_mode = self.async_mode.lower()
            if self.async_mode not in ("disabled", "async", "async_with_pinned_mem"):
                raise ValueError(f"Invalid async_mode: {self.async_mode}")
            if self.codec not in ("auto", "zstd", "raw"):
                raise ValueError(f"codec must be 'auto', 'zstd' or 'raw', not {self.codec!r}")
            if (self.local_folder is None) != (self.local_interval is None):
                raise ValueError("the local tier needs both local_folder and local_interval")
            if self.local_on_busy not in ("skip", "wait"):
                raise ValueError(f"local_on_busy must be 'skip' or 'wait', not "
                                 f"{self.local_on_busy!r}")
            if self.full_every is not None and self.full_every < 1:
                raise ValueError(f"full_every must be >= 1 or None, not {self.full_every}")
            if self.last_save_in_hf or self.initial_load_in_hf:
                raise ValueError("ShardCkptCheckpointManager reads and writes shardckpt "
                                 "checkpoints; for HF safetensors use `shardckpt export`")

    def __init__(self, config: Config, *, dataloader, model_parts, optimizers, lr_schedulers,
                 states: dict[str, Any], sd_adapter=None, base_folder: str = "",
                 on_event=None) -> None:
        self.enable = config.enable
        self.save_future = None
        if not self.enable:
            return
        self.config = config
        self.on_event = event_callback(on_event if on_event is not None else config.on_event)
        self.folder = filesystem.join(base_folder, config.folder)
        self.states = states
        self.states.update({MODEL: _base.ModelWrapper(model_parts), OPTIMIZER: optimizers,
                            DATALOADER: dataloader, LR_SCHEDULER: lr_schedulers})
        self.guards = [o for o in optimizers if isinstance(o, torch.optim.Optimizer)] \
            if hasattr(optimizers, "__iter__") else []
        self.export_dtype = TORCH_DTYPE_MAP[config.export_dtype]
        self._inflight: int | None = None  # the step of the save in flight
        self._group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")
        self._watcher = PreemptionWatcher((signal.SIGTERM,), config.grace_seconds) \
            if config.handle_preemption else None
        self._tier = None
        if config.local_folder is not None:
            durable = self._storage()
            durable.makedirs("")
            self._tier = LocalTier(config.local_folder, replicas=config.local_replicas,
                                   keep=config.local_keep, save_options={"codec": config.codec},
                                   staging_budget_bytes=config.staging_budget_bytes,
                                   on_busy=config.local_on_busy, durable=durable)
        logger.info(f"Checkpointing active (shardckpt). Checkpoints will be loaded from and "
                    f"saved to {self.folder}")

    # ------------------------------------------------------------------ layout
    def _storage(self):
        return open_storage(self.folder)

    def path(self, step: int) -> str:
        """Where the checkpoint of ``step`` lives: ``<folder>/step-<step>``."""
        return f"{self.folder.rstrip('/')}/step-{step}"

    def steps(self) -> dict[int, str]:
        """Committed checkpoints, ``{step: "shardckpt" or "dcp"}`` in ascending step order."""
        storage = self._storage()
        try:
            names = storage.list("")
        except FileNotFoundError:
            return {}
        found = {}
        for name in names:
            match = STEP_DIR.fullmatch(name)
            if match is None:
                continue
            if is_committed(storage, name):
                found[int(match.group(1))] = "shardckpt"
            elif storage.exists(f"{name}/{DCP_METADATA}"):
                found[int(match.group(1))] = "dcp"
        return dict(sorted(found.items()))

    # ------------------------------------------------------------------ saving
    def _should_save(self, step: int, last_step: bool) -> bool:
        if self.config.load_only:
            return False
        return (last_step or step % self.config.interval == 0
                or (step == 1 and self.config.enable_first_step_checkpoint))

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self.config.load_only and self._preemption_agreed():
            self._preempt(curr_step)
        if not self._should_save(curr_step, last_step):
            if self._tier is not None and not self.config.load_only and \
                    curr_step % self.config.local_interval == 0:
                self._tier.save_async(curr_step, self._full_state(),
                                      {META_KEY: {"step": curr_step, "kind": "local"}})
            return False
        self.maybe_wait_for_saving()
        begin = time.monotonic()
        if last_step and self.config.last_save_model_only:
            state = {MODEL: self._exported_weights()}
            self._write(curr_step, state, "model-only", background=False)
        else:
            self._write(curr_step, self._full_state(), "full",
                        background=self.config.async_mode != "disabled" and not last_step)
        logger.info(f"shardckpt: step {curr_step} {'staged' if self.save_future else 'saved'} "
                    f"in {time.monotonic() - begin:.2f} seconds")
        return True

    def _full_state(self) -> dict[str, Any]:
        return {k: v for k, v in self.states.items() if v is not None}

    def _exported_weights(self) -> dict[str, Any]:
        """The model's state, floating tensors cast to ``export_dtype``."""
        weights = self.states[MODEL].state_dict()
        return {k: v.to(self.export_dtype) if isinstance(v, torch.Tensor)
                and v.is_floating_point() and v.dtype != self.export_dtype else v
                for k, v in weights.items()}

    def _write(self, step: int, state, kind: str, background: bool) -> None:
        options = {"codec": self.config.codec, "overwrite": True,
                   "metadata": {META_KEY: {"step": step, "kind": kind}}}
        if self.config.incremental and kind == "full":
            options.update(self._incremental_base(step, options["metadata"][META_KEY]))
        if background:
            self.save_future = async_save(
                state, self.path(step), guard=self.guards,
                staging_budget_bytes=self.config.staging_budget_bytes, **options)
            self._inflight = step
            self.save_future.add_done_callback(self._reporter(step))
        else:
            self._reporter(step)(api.save(state, self.path(step), **options), None)
            self._committed(step)

    def _reporter(self, step: int):
        """The done callback that reports the commit of ``step``'s checkpoint."""
        def report(info, error) -> None:
            if error is None:
                emit(self.on_event, SAVE_COMMITTED, step, self.path(step),
                     seconds=info.seconds, raw_bytes=info.raw_bytes,
                     stored_bytes=info.stored_bytes)
        return report

    def _incremental_base(self, step: int, meta: dict) -> dict:
        """``save`` options of an incremental save; ``meta`` gets its chain length (saves since
        the last full one). A full save when there is no base, the base cannot be read, or
        ``full_every`` saves have referenced it."""
        previous = [s for s, kind in self.steps().items() if kind == "shardckpt" and s != step]
        meta["chain"] = 0
        if not previous:
            return {"content_hashes": True}
        base = f"step-{previous[-1]}"
        try:
            chain = int(open_manifest(self._storage(), base).metadata.get(
                META_KEY, {}).get("chain", 0)) + 1
        except CheckpointError as exc:
            logger.warning(f"shardckpt: {self.path(previous[-1])} cannot be a base ({exc}); "
                           "writing every chunk")
            return {"content_hashes": True}
        if self.config.full_every is not None and chain >= self.config.full_every:
            return {"content_hashes": True}
        meta["chain"] = chain
        return {"base": base, "content_hashes": True}

    def _wait_for_saving(self) -> None:
        handle, self.save_future = self.save_future, None
        step, self._inflight = self._inflight, None
        handle.result()
        self._committed(step)

    def _maybe_wait_for_staging(self) -> None:
        if self.save_future is not None:
            self.save_future.wait_staged()

    def _committed(self, step: int) -> None:
        """After a commit: rank 0 keeps the newest ``keep_latest_k`` checkpoints."""
        k = self.config.keep_latest_k
        if k <= 0 or _rank() != 0:
            return
        steps = [s for s in self.steps() if s != self._inflight]
        storage = self._storage()
        for old in steps[:-k]:
            logger.info(f"shardckpt: removing {self.path(old)} (keep_latest_k={k})")
            try:
                remove_checkpoint(storage, f"step-{old}")
            except (OSError, CheckpointError) as exc:  # the training goes on; the next commit
                logger.warning(f"shardckpt: cannot remove {self.path(old)}: {exc}")  # retries
                continue
            emit(self.on_event, REMOVED, old, self.path(old), reason="keep_latest_k")

    # ------------------------------------------------------------------ preemption
    def _preemption_agreed(self) -> bool:
        """Whether a preemption signal reached any rank (collective: every ``save`` call)."""
        if self._watcher is None:
            return False
        flag = int(self._watcher.pending)
        if self._group is not None:
            t = torch.tensor([flag], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
            flag = int(t.item())
        return bool(flag)

    def _preempt(self, step: int) -> None:
        """Save the full state at ``step`` on every rank, commit, stop the process (75)."""
        self._watcher.arm()
        self.maybe_wait_for_saving()
        if step not in self.steps():
            self._write(step, self._full_state(), "preemption", background=False)
        self._watcher.committed()
        logger.info(f"shardckpt: preempted; {self.path(step)} committed, exiting with "
                    f"{EXIT_PREEMPTED}")
        self._close()
        self.enable = False
        raise SystemExit(EXIT_PREEMPTED)

    # ------------------------------------------------------------------ loading
    def _load(self, step: int = -1) -> bool:
        exists = self._storage().exists("")
        if step != -1 and not exists:
            raise FileNotFoundError(f"--checkpoint.load_step={step} not found because "
                                    f"checkpoint.folder {self.folder} does not exist")
        found = self.steps() if exists else {}
        if step != -1:
            if step not in found:
                raise FileNotFoundError(f"--checkpoint.load_step={step} not found at "
                                        f"{self.path(step)}")
            self._load_from(self.path(step), found[step], step == 0)
            return True
        if self._tier is not None and self._load_local(max(found) if found else None):
            return True
        if found:
            return self._load_newest(found)
        if not self.config.initial_load_path:
            logger.info("No checkpoint was provided, this is a fresh start.")
            return False
        path = self.config.initial_load_path
        kind = "dcp" if open_storage(path).exists(DCP_METADATA) else "shardckpt"
        self._load_from(path, kind, self.config.initial_load_model_only)
        return True

    def _load_newest(self, found: dict[int, str]) -> bool:
        """Load the newest checkpoint that loads, falling back past damaged ones (incomplete,
        corrupt, unreadable: each named in a warning); the ranks agree on every verdict.

        Raises:
            the error of the newest checkpoint when it says the state or the storage is at
            fault (a mismatch, an outage), or when every checkpoint failed.
        """
        last = None
        for step in sorted(found, reverse=True):
            error = None
            try:
                self._load_from(self.path(step), found[step], step == 0)
            except CheckpointError as exc:
                error = exc
            verdict = self._agree(OK if error is None else FATAL if is_fatal(error) else SKIP)
            if verdict == OK:
                return True
            if verdict == FATAL:
                raise error or CheckpointError(f"{self.path(step)}: loading failed on another "
                                               "rank")
            last = error
            logger.warning(f"shardckpt: skipping {self.path(step)}: "
                           f"{type(error).__name__ if error else 'another rank'}: {error}")
        raise last or CheckpointError(f"{self.folder}: no checkpoint loads on every rank")

    def _agree(self, verdict: int) -> int:
        """The worst verdict over the ranks."""
        if self._group is None:
            return verdict
        t = torch.tensor([verdict], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return int(t.item())

    def _load_local(self, durable: int | None) -> bool:
        """Load the newest local-tier checkpoint newer than the durable ``durable``, if any."""
        states = self._states_to_load(False)
        newer_than = None if durable is None else durable - 1  # a local copy of it is faster
        loaded = self._tier.restore(states, newer_than,
                                    {"strict": not self.config.exclude_from_loading})
        if loaded is None:
            return False
        logger.info(f"shardckpt: loaded step {loaded} from the local tier")
        return True

    def _load_from(self, path: str, kind: str, model_only: bool) -> None:
        begin = time.monotonic()
        logger.info(f"Loading the checkpoint from {path}.")
        states = self._states_to_load(model_only)
        if kind == "dcp":
            self._load_dcp(states, path)
        else:
            self._load_shardckpt(states, path, model_only)
        logger.info(f"Finished loading the checkpoint in {time.monotonic() - begin:.2f} "
                    "seconds.")

    def _states_to_load(self, model_only: bool) -> dict[str, Any]:
        if model_only:
            return {MODEL: self.states[MODEL]}
        for key in self.config.exclude_from_loading:
            if key not in self.states:
                raise ValueError(f"{key} not found in state_dict.")
        return {k: v for k, v in self._full_state().items()
                if k not in self.config.exclude_from_loading}

    def _load_shardckpt(self, states: dict, path: str, model_only: bool) -> None:
        storage, name = _split(path)
        m = open_manifest(storage, name)
        saved = dict(dict_items(node_kind(m.tree)[1]))
        missing = sorted(set(states) - set(saved))
        if missing:
            raise StateMismatchError(missing=missing)
        world = dist.get_world_size() if dist.is_initialized() else 1
        per_rank = "error"
        if world != m.world_size and m.rank_overrides:
            differing = {path[0] for _, own in m.rank_overrides for path, _ in own if path}
            if not differing & set(states):  # only values nobody loads differ between ranks
                per_rank = "rank0"
        strict = set(saved) == set(states)
        api.load(states, path, strict=strict, per_rank=per_rank)
        if not strict:
            self._check_model_keys(saved[MODEL], path)

    def _check_model_keys(self, node, path: str) -> None:
        """A partial load skips keys missing from the checkpoint; the model's may not be."""
        have = {k for k, _ in dict_items(node_kind(node)[1])}
        missing = sorted(set(self.states[MODEL].state_dict()) - have)
        if missing:
            raise StateMismatchError(missing=[f"{MODEL}/{k}" for k in missing])

    def _load_dcp(self, states: dict, path: str) -> None:
        """Load a checkpoint of torchtitan's DCP backend (its flattened layout)."""
        import torch.distributed.checkpoint as dcp
        flat = {k: v for k, v in states.items() if k != MODEL}
        flat.update(states[MODEL].state_dict())
        dcp.load(flat, checkpoint_id=path)
        self.states[MODEL].load_state_dict(flat)

    # ------------------------------------------------------------------ closing
    def _close(self) -> None:
        try:
            if self.save_future is not None:
                self._wait_for_saving()
        finally:
            if self._watcher is not None:
                self._watcher.close()
                self._watcher = None
            if self._tier is not None:
                self._tier.close()
                self._tier = None
            if self._group is not None:
                dist.destroy_process_group(self._group)
                self._group = None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _split(path: str):
    """(storage of the parent, name) of a checkpoint path."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return open_storage(parent or "/"), name
