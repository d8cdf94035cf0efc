"""``MLflowCheckpoints``: each committed checkpoint as an MLflow 3 logged model, by reference.

    import mlflow, shardckpt
    from shardckpt.integrations.mlflow import MLflowCheckpoints
    with mlflow.start_run() as run:
        tracker = MLflowCheckpoints()              # the active run (or run_id=, tracking_uri=)
        mgr = shardckpt.CheckpointManager("ckpt", every_n_steps=500, keep_last=3,
                                          keep_best=1, monitor="val_loss", on_event=tracker)
        ...
    path = MLflowCheckpoints.resolve(run.info.run_id, alias="best")   # ready for shardckpt.load

A checkpoint becomes an external logged model (``mlflow.model.isExternal``: its files stay
where they are) named after its folder, in the run's experiment, with its metrics at its step
(so ``mlflow.search_logged_models`` filters and sorts on them) and ``shardckpt.*`` tags: the
URI, step, epoch, kind, bytes, the manifest's CRC-32C and its state. The aliases ``latest`` and
``best`` are a model tag ``shardckpt.alias.<name>`` on the one model that holds them and a run
tag of the same name naming its model id (what ``resolve`` reads). A checkpoint the manager
removes keeps its model, tagged ``shardckpt.state=removed`` and ``shardckpt.deleted=true``,
without aliases (``on_removed="delete"`` deletes the model instead); a demoted one is tagged
``shardckpt.kind=weights``. Needs ``pip install 'shardckpt[mlflow]'``.
"""

from __future__ import annotations

import os

from . import require
from .trackers import CheckpointRecord, TrackerCallback, as_error
from ..errors import TrackerError

_mlflow = require("mlflow", "mlflow", "MLflowCheckpoints")

__all__ = ["MLflowCheckpoints", "MODEL_TYPE"]

MODEL_TYPE = "shardckpt-checkpoint"
TAG = "shardckpt."


def _tags(record: CheckpointRecord, external: bool) -> dict:
    """The model's ``shardckpt.*`` tags (MLflow tags are strings)."""
    tags = {TAG + k: str(v) for k, v in (
        ("uri", record.uri), ("step", record.step), ("epoch", record.epoch),
        ("kind", record.kind), ("reason", record.reason), ("state", record.state),
        ("bytes_written", record.bytes_written),
        ("bytes_referenced", record.bytes_referenced),
        ("manifest_crc32c", record.manifest_crc32c)) if v is not None}
    if external:
        tags["mlflow.model.isExternal"] = "true"
    tags["mlflow.note.content"] = (  # the UI's description
        f"shardckpt checkpoint ({record.kind}, {record.state}) at {record.uri}")
    return tags


def _params(record: CheckpointRecord) -> dict:
    """What never changes about a checkpoint, as the model's params (the UI shows them)."""
    return {k: str(v) for k, v in (
        ("uri", record.uri), ("step", record.step), ("epoch", record.epoch),
        ("manifest_crc32c", record.manifest_crc32c)) if v is not None}


def _numbers(metrics: dict | None) -> dict:
    """The metrics MLflow can log (numbers; None, text and booleans are left out)."""
    return {k: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MLflowCheckpoints(TrackerCallback):
    """Register each committed checkpoint in an MLflow run, by reference (an ``on_event``).

    Args:
        run_id: the run to register into (default: the active run, ``mlflow.active_run()``).
        tracking_uri: the tracking server (default: ``mlflow.get_tracking_uri()`` now).
        copy: also upload the checkpoint's files as the model's artifacts (local folders
            only). Off by default: the point is not to store tens of GB twice.
        on_removed: ``"tag"`` (keep the model, tagged removed) or ``"delete"`` (delete it).
        **options: ``monitor``, ``mode``, ``rank0_only``, ``retry_max_seconds``,
            ``storage_options`` (see ``TrackerCallback``).

    Raises:
        TrackerError: no ``run_id`` and no active run.
        ValueError: ``on_removed`` is neither ``"tag"`` nor ``"delete"``.
    """

    def __init__(self, run_id: str | None = None, tracking_uri: str | None = None, *,
                 copy: bool = False, on_removed: str = "tag", **options):
        super().__init__(**options)
        if on_removed not in ("tag", "delete"):
            raise ValueError(f"on_removed must be 'tag' or 'delete', not {on_removed!r}")
        if run_id is None:
            active = _mlflow.active_run()
            if active is None:
                raise TrackerError("MLflowCheckpoints: no active MLflow run; start one "
                                   "(mlflow.start_run()) or pass run_id=")
            run_id = active.info.run_id
        self.run_id = run_id
        self.tracking_uri = tracking_uri or _mlflow.get_tracking_uri()
        self.copy, self.on_removed = copy, on_removed
        self.client = _mlflow.MlflowClient(self.tracking_uri)
        self.model_ids: dict[int, str] = {}  # step -> logged model id
        self._experiment_id: str | None = None
        self._metrics_logged: set[int] = set()

    # ------------------------------------------------------------ registration (worker)
    def _experiment(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return self._experiment_id

    def _commit(self, record: CheckpointRecord) -> None:
        step, client = record.step, self.client
        tags = _tags(record, external=not self.copy)
        model_id = self.model_ids.get(step)
        if model_id is None:
            model = client.create_logged_model(
                self._experiment(), name=os.path.basename(record.uri.rstrip("/")),
                source_run_id=self.run_id, tags=tags, params=_params(record),
                model_type=MODEL_TYPE)
            self.model_ids[step] = model_id = model.model_id
        else:  # the step was saved again, or this is a retry
            client.set_logged_model_tags(model_id, tags)
        if step not in self._metrics_logged:
            for key, value in _numbers(record.metrics).items():
                client.log_metric(self.run_id, key, value, step=step or 0, model_id=model_id)
            self._metrics_logged.add(step)
        if self.copy:
            self._upload(record, model_id)
        client.finalize_logged_model(model_id, "READY")
        for alias in record.aliases:
            self._hold(alias, model_id)

    def _hold(self, alias: str, model_id: str) -> None:
        """Give ``alias`` to the model: its tag, and the run tag ``resolve`` reads."""
        key = TAG + "alias." + alias
        self.client.set_logged_model_tags(model_id, {key: "true"})
        self.client.set_tag(self.run_id, key, model_id)

    def _created(self, step: int) -> bool:
        return step in self.model_ids

    def _upload(self, record: CheckpointRecord, model_id: str) -> None:
        if "://" in record.uri:
            raise TrackerError(f"MLflowCheckpoints(copy=True) uploads local folders only, "
                               f"not {record.uri}")
        self.client.log_model_artifacts(model_id, record.uri)

    def _remove(self, record: CheckpointRecord) -> None:
        model_id = self.model_ids.get(record.step)
        if model_id is None:
            return
        for alias in record.aliases:  # nothing may point at a folder that is gone
            self._drop_alias(alias, record)
            _forget(lambda key=TAG + "alias." + alias: self.client.delete_tag(self.run_id, key))
        self.model_ids.pop(record.step)
        if self.on_removed == "delete":
            self.client.delete_logged_model(model_id)
        else:
            self.client.set_logged_model_tags(model_id, {
                TAG + "state": "removed", TAG + "deleted": "true",
                "mlflow.note.content": f"shardckpt checkpoint removed by retention: "
                                       f"{record.uri} no longer exists"})

    def _demote(self, record: CheckpointRecord) -> None:
        model_id = self.model_ids.get(record.step)
        if model_id is not None:
            self.client.set_logged_model_tags(model_id, _tags(record, not self.copy))

    def _drop_alias(self, alias: str, old: CheckpointRecord) -> None:
        model_id = self.model_ids.get(old.step)
        if model_id is not None:
            _forget(lambda: self.client.delete_logged_model_tag(model_id,
                                                                TAG + "alias." + alias))

    def _move_alias(self, alias: str, old: CheckpointRecord | None,
                    new: CheckpointRecord | None) -> None:
        if old is not None:
            self._drop_alias(alias, old)
        if new is not None:
            self._hold(alias, self.model_ids[new.step])
        else:
            _forget(lambda: self.client.delete_tag(self.run_id, TAG + "alias." + alias))

    # ------------------------------------------------------------ loading
    @staticmethod
    def resolve(run_id: str, alias: str | int = "best", tracking_uri: str | None = None) -> str:
        """The URI of a run's checkpoint, ready for ``shardckpt.load``.

        Args:
            run_id: the MLflow run the checkpoints were registered in.
            alias: ``"latest"``, ``"best"``, or a step (an int, ``"1200"`` or
                ``"step-00001200"``).
            tracking_uri: the tracking server (default: ``mlflow.get_tracking_uri()``).

        Returns:
            the checkpoint folder's path or URL.

        Raises:
            CheckpointNotFoundError: the run names no such checkpoint, or it was removed.
        """
        client = _mlflow.MlflowClient(tracking_uri or _mlflow.get_tracking_uri())
        run = client.get_run(run_id)
        step = _as_step(alias)
        if step is None:
            model_id = run.data.tags.get(TAG + "alias." + str(alias))
            if model_id is None:
                raise as_error(f"MLflow run {run_id} has no checkpoint aliased {alias!r}")
            model = client.get_logged_model(model_id)
        else:
            found = client.search_logged_models(
                [run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}' AND tags.`{TAG}step` = '{step}'")
            if not found:
                raise as_error(f"MLflow run {run_id} has no checkpoint of step {step}")
            model = max(found, key=lambda m: m.creation_timestamp)
        if model.tags.get(TAG + "state") == "removed":
            raise as_error(f"MLflow run {run_id}: the checkpoint {alias!r} "
                           f"({model.tags.get(TAG + 'uri')}) was removed by retention")
        return model.tags[TAG + "uri"]


def _as_step(alias) -> int | None:
    """A step from ``1200``, ``"1200"`` or ``"step-00001200"``; None for a named alias."""
    if isinstance(alias, int):
        return alias
    text = str(alias)
    text = text[len("step-"):] if text.startswith("step-") else text
    return int(text) if text.isdigit() else None


def _forget(call) -> None:
    """Run ``call``, a removal of a tag that may not be there (an earlier try removed it)."""
    try:
        call()
    except _mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
