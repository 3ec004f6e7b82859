"""train.report_to: what each tracker holds after a run, read back from its own files (TensorBoard's event
file, W&B's offline run file, MLflow's SQLite store), and curves.png. Nothing here reaches a network: W&B runs
with WANDB_MODE=offline, MLflow in a store under the run folder."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from interbert.train import Trainer, TrainConfig
from interbert.train.curves import CURVES_NAME, write_loss_comparison, write_run_curves
from interbert.train.tracking import TRACKERS_NAME, flat_hparams
from test_train_toy import ToyDataset, ToyModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["tensorboard", "wandb", "mlflow"]
EXTRA_OF = {"wandb": "wandb", "mlflow": "mlflow"}


@pytest.fixture(autouse=True)
def offline_trackers(monkeypatch):
    """W&B offline, MLflow in the run folder: whatever the machine's environment says."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def needs(backend: str) -> None:
    """Skip, saying which extra to install, where the backend's package is missing (make test installs both)."""
    if backend in EXTRA_OF:
        pytest.importorskip(backend, reason=f"the [{EXTRA_OF[backend]}] extra is not installed: "
                                            f"pip install -c constraints.txt -e '.[{EXTRA_OF[backend]}]'")


# --- reading each tracker's files back ---------------------------------------------------------------

def read_tensorboard(out: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    metrics = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG]).session_start_info
    params = {key: getattr(value, value.WhichOneof("kind")) for key, value in start.hparams.items()}
    end = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_END_INFO_TAG]).session_end_info
    status = {api_pb2.STATUS_SUCCESS: "finished", api_pb2.STATUS_FAILURE: "failed"}[end.status]
    return {"params": params, "metrics": metrics, "status": status}


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (``run-<id>.wandb``): a LevelDB-style log of 32 KiB blocks,
    each record a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if position + 7 + length > len(data):
            return  # a record still being written
        payload = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)


def read_wandb(out: Path, wait: float = 30.0) -> dict:
    """The run's config, history and exit code. W&B's service writes the file behind ``run.finish()`` (the
    exit record may still be on its way when finish returns), so this reads until the exit record is there."""
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + wait
    records = list(wandb_records(path))
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = list(wandb_records(path))
    config, metrics, status = {}, {}, None
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = (record.run.config.update if kind == "run" else record.config.update if kind == "config" else [])
        config.update({item.key: json.loads(item.value_json) for item in updates if not item.key.startswith("_")})
        if kind == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for name, value in items.items():
                if not name.startswith("_"):
                    metrics.setdefault(name, {})[items["_step"]] = value
        if kind == "exit":
            status = "finished" if record.exit.exit_code == 0 else "failed"
    return {"params": flat_hparams(config), "metrics": metrics, "status": status, "run_id": path.stem[4:]}


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made: creating them takes seconds (MLflow's migrations), so the
    runs that test something else start from a copy, as a run folder reused for a second run would."""
    pytest.importorskip("mlflow")
    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow_client(path.parent.parent, path).search_experiments()
    return path


def with_mlflow_store(out: Path, template: Path) -> Path:
    (out / "mlflow").mkdir(parents=True)
    shutil.copyfile(template, out / "mlflow" / "mlflow.db")
    return out


def mlflow_client(out: Path, db: Path | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(db or out / 'mlflow' / 'mlflow.db').absolute()}")


def read_mlflow(out: Path) -> dict:
    client = mlflow_client(out)
    (run,) = client.search_runs([client.get_experiment_by_name("interbert").experiment_id])
    metrics = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
               for name in run.data.metrics}
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(out / "downloaded")))
    return {"params": run.data.params, "metrics": metrics, "status": run.info.status.lower(), "run": run,
            "config": config.read_text(), "metric_counts": {n: len(client.get_metric_history(run.info.run_id, n))
                                                            for n in run.data.metrics}}


READERS = {"tensorboard": read_tensorboard, "wandb": read_wandb, "mlflow": read_mlflow}


# --- runs ------------------------------------------------------------------------------------------

class DivergingToy(ToyModel):
    """The toy whose loss turns NaN at the ``nan_at``-th forward: a run that fails half-way."""

    def __init__(self, nan_at: int):
        super().__init__()
        self.nan_at, self.calls = nan_at, 0

    def forward(self, features, targets, example_index=None):
        self.calls += 1
        output = super().forward(features, targets, example_index)
        if self.calls >= self.nan_at:
            output.loss = output.loss * float("nan")
        return output


def toy_config(out: Path, **settings) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(out), "batch_size": 8, "max_steps": 4, "log_every": 1, "learning_rate": 1e-2,
                          "progress_bar": False, "seed": 3, **settings})


def fit_toy(out: Path, model=None, resume: bool = False, **settings):
    torch.manual_seed(0)
    trainer = Trainer(model or ToyModel(), ToyDataset(64), toy_config(out, **settings),
                      eval_fn=lambda evaluated: {"score": 0.5 + trainer.step}, hparams={"model": {"name": "toy", "hidden": 16}})
    return trainer.fit(resume=resume)


@pytest.fixture
def run_folder(tmp_path, request):
    """``run_folder(*backends)``: ``tmp_path/run`` for a run reporting to ``backends`` (skipped where one is
    not installed), holding a copy of the empty MLflow store when MLflow is among them."""
    def make(*backends: str) -> Path:
        for backend in backends:
            needs(backend)
        if "mlflow" in backends:
            return with_mlflow_store(tmp_path / "run", request.getfixturevalue("empty_mlflow_store"))
        return tmp_path / "run"
    return make


@pytest.mark.parametrize("backend", BACKENDS)
def test_report_to_records_hparams_per_update_scalars_and_validation(backend, run_folder):
    out = run_folder(backend)
    result = fit_toy(out, report_to=[backend], eval_every=2)
    run = READERS[backend](out)
    # hyperparameters: the recipe's (here the model section) and the loop's, flattened to dotted keys
    assert float(run["params"]["train.learning_rate"]) == pytest.approx(1e-2)
    assert str(run["params"]["model.name"]) == "toy" and int(float(run["params"]["model.hidden"])) == 16
    # every update's training scalars and every validation, at their update
    assert run["metrics"]["train/loss"] == pytest.approx(dict(enumerate(result.history["loss"], start=1)))
    assert set(run["metrics"]) >= {"train/regression_loss", "train/lr", "train/examples_per_second"}
    assert run["metrics"]["val/score"] == pytest.approx({2: 2.5, 4: 4.5})
    assert run["status"] == "finished"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_run_still_ends_its_tracker_as_failed_and_draws_its_curves(backend, run_folder):
    out = run_folder(backend)
    with pytest.raises(FloatingPointError, match="loss is nan at update 3"):
        fit_toy(out, DivergingToy(nan_at=3), report_to=[backend])
    run = READERS[backend](out)
    assert run["status"] == "failed"
    assert sorted(run["metrics"]["train/loss"]) == [1, 2]  # what came before the failure is kept
    assert_png(out / CURVES_NAME)  # a diverged run is when one looks at its curves


def test_all_three_at_once_and_the_mlflow_run_holds_the_resolved_config(run_folder):
    out = run_folder(*BACKENDS)
    fit_toy(out, report_to=BACKENDS)
    assert {backend: READERS[backend](out)["status"] for backend in BACKENDS} == dict.fromkeys(BACKENDS, "finished")
    mlflow = read_mlflow(out)
    assert "learning_rate: 0.01" in mlflow["config"] and "name: toy" in mlflow["config"]  # nested, as in a config file
    assert mlflow["run"].info.run_name == "run"  # named after the run folder
    ids = json.loads((out / TRACKERS_NAME).read_text())
    assert ids == {"wandb": read_wandb(out)["run_id"], "mlflow": mlflow["run"].info.run_id}


def test_a_resumed_run_goes_on_in_the_same_mlflow_run(run_folder):
    out = run_folder("mlflow")
    with pytest.raises(FloatingPointError):  # dies at update 3, after the checkpoint of update 2
        fit_toy(out, DivergingToy(nan_at=3), report_to=["mlflow"], save_every=2)
    assert read_mlflow(out)["status"] == "failed"
    fit_toy(out, resume=True, report_to=["mlflow"], save_every=2)
    run = read_mlflow(out)  # one run in the experiment, not two
    assert run["status"] == "finished"
    assert sorted(run["metrics"]["train/loss"]) == [1, 2, 3, 4] and run["metric_counts"]["train/loss"] == 4


def test_only_rank_0_reports_under_torchrun(run_folder):
    tmp_path = run_folder("tensorboard", "mlflow")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(REPO / "tests" / "train" / "test_train_toy.py"), "--output-dir", str(tmp_path), "--max-steps", "4",
               "--batch-size", "4", "--dataset-size", "32", "--eval-every", "2", "--report-to", "tensorboard", "mlflow"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    run = read_mlflow(tmp_path)  # one MLflow run, each update logged once (not once per rank)
    assert run["status"] == "finished" and run["metric_counts"]["train/loss"] == 4
    assert run["metrics"]["val/score"] == {2: -2.0, 4: -4.0}
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert read_tensorboard(tmp_path)["status"] == "finished"
    assert_png(tmp_path / CURVES_NAME)


# --- train.report_to as a setting --------------------------------------------------------------------

def test_tensorboard_key_maps_onto_report_to():
    assert TrainConfig().reporting_backends() == ["tensorboard"]  # what every run did before report_to
    assert TrainConfig(tensorboard=False).reporting_backends() == []
    assert TrainConfig(report_to=["wandb"]).reporting_backends() == ["wandb"]  # once set, report_to decides
    assert TrainConfig(report_to="mlflow").report_to == ["mlflow"]  # train.report_to=mlflow on a command line
    assert TrainConfig(report_to=["none"], tensorboard=True).reporting_backends() == []
    # a shipped config that turns TensorBoard off still takes train.report_to=[tensorboard,...]
    assert TrainConfig(report_to=["tensorboard"], tensorboard=False).reporting_backends() == ["tensorboard"]
    with pytest.raises(ValueError, match="report_to lists none beside wandb"):
        TrainConfig(report_to=["none", "wandb"])
    with pytest.raises(ValueError, match="report_to names mlflow twice"):
        TrainConfig(report_to=["mlflow", "mlflow"])


def test_a_bad_report_to_value_is_one_error_line_listing_the_valid_ones(capsys):
    from interbert.cli import main

    assert main(["pretrain", "--print-config", "train.report_to=[tensorboard,wandbb]"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.report_to" in lines[0]
    assert "tensorboard, wandb, mlflow, none" in lines[0] and "'wandbb'" in lines[0]


def test_a_pretraining_run_reports_its_recipe_settings_and_draws_its_curves(tmp_path, capsys):
    needs("mlflow")
    from interbert.cli import main

    data = tmp_path / "data"
    assert main(["data", "synth", str(data), "--images", "24", "--feature-dim", "32", "--num-classes", "12",
                 "--no-images", "--workers", "1"]) == 0
    out = tmp_path / "pretrain"
    assert main(["pretrain", f"data.captions={data / 'captions.json'}", f"data.features={data / 'regions.tsv'}",
                 "data.vocab_size=120", f"train.output_dir={out}", "train.progress_bar=false", "train.max_steps=2",
                 "train.batch_size=4", "train.eval_every=2", "train.report_to=mlflow", "threads=1"]) == 0
    run = read_mlflow(out)
    assert run["params"]["recipe"] == "pretrain" and run["params"]["data.vocab_size"] == "120"
    assert run["params"]["train.report_to"] == '["mlflow"]' and "val/loss" in run["metrics"]
    assert not (out / "tensorboard").exists()  # report_to decides once set
    assert_png(out / CURVES_NAME)


# --- curves.png --------------------------------------------------------------------------------------

def assert_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.verify()  # a whole, valid PNG
    image = Image.open(path)
    assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert len(image.convert("RGB").getcolors(1 << 16) or [0] * 3) > 2  # something drawn, not a blank page
    return image


def test_every_run_writes_curves_updated_at_each_validation(tmp_path):
    out = tmp_path / "run"
    seen = []

    def eval_fn(model):  # at the second evaluation, the first one's curves are on disk
        seen.append((out / CURVES_NAME).exists())
        return {"score": 1.0, "R@1": 20.0}

    torch.manual_seed(0)
    Trainer(ToyModel(), ToyDataset(64), toy_config(out, eval_every=2, report_to=["none"]), eval_fn=eval_fn).fit()
    assert seen == [False, True]
    assert_png(out / CURVES_NAME)


def test_run_curves_draw_a_panel_per_loss_and_metric(tmp_path):
    history = {"loss": [3.0 - 0.01 * i for i in range(120)], "msm_loss": [1.0] * 120,
               "itm_loss": [None if i % 2 else 0.69 for i in range(120)], "lr": [1e-4] * 120}
    evals = [{"step": 60, "loss": 2.5, "R@1": 10.0}, {"step": 120, "loss": 2.0, "R@1": float("nan")}]
    one = assert_png(write_run_curves(tmp_path / "one.png", {"loss": history["loss"]}, []))
    many = assert_png(write_run_curves(tmp_path / "many.png", history, evals))
    assert many.height > one.height  # loss, itm_loss, msm_loss, R@1: two rows of three panels
    assert_png(write_run_curves(tmp_path / "empty.png", {}, []))  # a run resumed at its end


def test_loss_comparison_averages_runs_per_label(tmp_path):
    runs = {label: [{"itm_loss": [0.7 - 0.001 * i * (row + 1) + 0.01 * seed for i in range(60)], "msm_loss": [2.0] * 60}
                    for seed in range(2)] for row, label in enumerate(["interbert", "random negatives"])}
    runs["too short"] = [{"itm_loss": [0.5] * 5}]
    path = write_loss_comparison(tmp_path / "ablations.png", runs, ["itm_loss", "msm_loss"], window=10,
                                 reference_lines={"itm_loss": [(0.693, ":")]}, xlabel="pretraining step")
    assert_png(path)
