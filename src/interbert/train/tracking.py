"""The experiment trackers a run reports to (``train.report_to``): TensorBoard, Weights & Biases, MLflow.

Each gets the same three things, so that runs compare in whichever the user reads: the run's hyperparameters
once (the resolved config: TensorBoard's HParams, W&B's run config, MLflow's params and the config as an
artifact), scalars by update (``train/*`` every ``log_every`` updates, ``val/*`` at each validation), and an
end carrying the run's outcome (finished, failed, killed), written also when training raised. Only rank 0
opens them (:class:`~interbert.train.reporting.Reporter`).

Nothing reaches a network unless the user's environment asks for it: W&B follows ``WANDB_MODE`` (``offline``
logs without an account; ``wandb sync`` uploads later), and MLflow writes to a SQLite store in the run folder
unless ``MLFLOW_TRACKING_URI`` names another (MLflow 3 refuses its older ``mlruns`` file store unless told to,
and keeps it in maintenance mode only). A resumed run goes on in the same W&B and MLflow runs: their ids are
kept in ``trackers.json`` beside the checkpoint. The updates a killed run reported after its last checkpoint
are reported again after the resume: TensorBoard purges its earlier copies, MLflow keeps both values at
those steps, W&B ignores the repeats (its steps only go up).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from interbert.errors import UsageError
from interbert.extras import EXTRA_MODULES, require_extra
from interbert.utils import files

logger = logging.getLogger(__name__)

TRACKERS_NAME = "trackers.json"  # the W&B and MLflow run ids, for --resume
FINISHED, FAILED, KILLED = "finished", "failed", "killed"  # how a run ended
DEFAULT_PROJECT = "interbert"  # the W&B project / MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME


class Tracker(Protocol):
    """What :class:`~interbert.train.reporting.Reporter` needs of a backend."""

    def log(self, scalars: Mapping[str, float], step: int) -> None: ...

    def finish(self, status: str) -> None: ...


def require_backends(names: Sequence[str]) -> None:
    """Stop with one ``error:`` line naming the extra when a backend in ``names`` is not installed (before any
    work: every rank checks, so that no rank waits for one that stopped)."""
    for name in names:
        if name in EXTRA_MODULES:
            require_extra(name, f"train.report_to: {name}")


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as ``{"train.learning_rate": 1e-4, ...}``: numbers, booleans and strings as they are,
    anything else (None, lists) as its JSON text, since TensorBoard and MLflow take only scalars."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def read_run_ids(output_dir: Path) -> dict[str, str]:
    path = output_dir / TRACKERS_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_writer(output_dir: Path, step: int):
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

    # purge_step drops events a killed run wrote after its last checkpoint.
    return SummaryWriter(str(output_dir / "tensorboard"), purge_step=step or None)


class TensorBoardTracker:
    """Scalars in ``output_dir/tensorboard`` (the event file ``train.tensorboard`` always wrote), the
    hyperparameters as TensorBoard's HParams dashboard reads them (the experiment naming the metrics to
    compare, the session's values) and the config as text; at the end, the session's status."""

    def __init__(self, output_dir: Path, step: int, hparams: Mapping[str, Any], metric_tags: Sequence[str]):
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self.writer = summary_writer(output_dir, step)
        experiment, session_start, _ = hparams_summaries(flat_hparams(hparams), dict.fromkeys(metric_tags, 0.0))
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(dict(hparams), sort_keys=False) + "```", step)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # someone may be watching: show the points now, not at the next flush

    def finish(self, status: str) -> None:
        self.writer.file_writer.add_summary(session_end_summary(status))
        self.writer.close()


def session_end_summary(status: str):
    """The HParams plugin's session end with the run's outcome, built as torch's ``hparams`` builds its
    (always successful) one; tensorboard's own ``session_end_pb`` needs TensorFlow."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS if status == FINISHED else api_pb2.STATUS_FAILURE,
                                         end_time_secs=time.time())
    content = plugin_data_pb2.HParamsPluginData(session_end_info=end, version=metadata.PLUGIN_DATA_VERSION)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin))])


class WandbTracker:
    """A W&B run named after the run folder, its config the resolved settings; its files under
    ``output_dir/wandb`` unless ``WANDB_DIR`` says elsewhere."""

    def __init__(self, output_dir: Path, hparams: Mapping[str, Any], run_name: str, run_id: str | None):
        import wandb

        settings = {"project": os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), "name": run_name,
                    "config": dict(hparams), "id": run_id, "resume": "allow" if run_id else None,
                    "reinit": "create_new"}  # never finishes a run the caller has open
        if "WANDB_DIR" not in os.environ:
            settings["dir"] = str(output_dir)
        try:
            self.run = wandb.init(**settings)
        except wandb.Error as error:
            raise UsageError(f"train.report_to: wandb could not start a run ({error}); WANDB_MODE=offline "
                             "logs without an account") from None
        self.id = self.run.id

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == FINISHED else 1)


class MlflowTracker:
    """An MLflow run named after the run folder, in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default
    interbert): the flattened settings as params, the nested ones as ``config.yaml``, scalars as metrics."""

    def __init__(self, output_dir: Path, hparams: Mapping[str, Any], run_name: str, run_id: str | None):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        folder = (output_dir / "mlflow").absolute()
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            folder.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{folder / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        try:
            if run_id is not None:  # params are immutable in MLflow and were logged when the run started
                self.client.update_run(run_id, status="RUNNING")
                self.id = run_id
            else:
                self.id = self._start(hparams, run_name, None if os.environ.get("MLFLOW_TRACKING_URI") else folder)
        except MlflowException as error:
            raise UsageError(f"train.report_to: mlflow could not start a run at {uri} ({error.message})") from None

    def _start(self, hparams: Mapping[str, Any], run_name: str, artifacts_in: Path | None) -> str:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a store of our own keeps its artifacts beside it, not in the working directory
            location = (artifacts_in / "artifacts").as_uri() if artifacts_in is not None else None
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        # the whole value stays in config.yaml; a param holds what MLflow's limit allows
        params = [Param(mlflow_key(key), str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flat_hparams(hparams).items()]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start:start + MAX_PARAMS_TAGS_PER_BATCH])
        self.client.log_dict(run_id, dict(hparams), "config.yaml")
        return run_id

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(mlflow_key(name), float(value), now, step)
                                                for name, value in scalars.items()])

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.id, {FINISHED: "FINISHED", FAILED: "FAILED", KILLED: "KILLED"}[status])


def mlflow_key(name: str) -> str:
    """``name`` in the characters MLflow accepts in a key (``lr_multipliers.text.*`` -> ``lr_multipliers.text._``)."""
    return re.sub(r"[^\w./\- ]", "_", name)[:250]


def open_trackers(names: Sequence[str], output_dir: Path, step: int, hparams: Mapping[str, Any],
                  metric_tags: Sequence[str], resume: bool) -> list[Tracker]:
    """One tracker per name in ``names``, in that order. ``resume``: continue the W&B and MLflow runs whose
    ids ``trackers.json`` holds. Should one fail to start, those already open end as failed."""
    run_ids = read_run_ids(output_dir) if resume else {}
    run_name = output_dir.absolute().name
    opened: dict[str, Tracker] = {}
    try:
        for name in names:
            if name == "tensorboard":
                opened[name] = TensorBoardTracker(output_dir, step, hparams, metric_tags)
            elif name == "wandb":
                opened[name] = WandbTracker(output_dir, hparams, run_name, run_ids.get(name))
            elif name == "mlflow":
                opened[name] = MlflowTracker(output_dir, hparams, run_name, run_ids.get(name))
            else:
                raise ValueError(f"unknown tracker {name!r}")  # TrainConfig refuses it before: a bug
    except BaseException:
        finish_all(list(opened.values()), FAILED)
        raise
    ids = {name: tracker.id for name, tracker in opened.items() if hasattr(tracker, "id")}
    if ids:
        files.atomic_write_json(output_dir / TRACKERS_NAME, ids)
    return list(opened.values())


def finish_all(trackers: Sequence[Tracker], status: str) -> None:
    """End every tracker with ``status``; one that fails to end does not keep the others open. Its error is
    raised after the others ended when the run finished, and logged when the run already failed (the run's
    own error is the one to see)."""
    first: BaseException | None = None
    for tracker in trackers:
        try:
            tracker.finish(status)
        except Exception as error:
            logger.warning("could not end the %s run: %s", type(tracker).__name__, error)
            first = first or error
    if first is not None and status == FINISHED:
        raise first
