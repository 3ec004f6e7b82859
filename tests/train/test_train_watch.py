"""Watching a run: validation metrics, model_best/, early stopping, the last K checkpoints, the console
loss line, and a resume that keeps the best-model and early-stopping state."""

from __future__ import annotations

import errno
import logging

import pytest
import torch

from interbert.train import BEST_MODEL_DIR, CHECKPOINT_NAME, FINAL_WEIGHTS_NAME, HISTORY_NAME, Trainer, TrainConfig
from interbert.utils.files import leftover_temporaries
from test_train_toy import ToyDataset, ToyModel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(folder, **overrides) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(folder), "progress_bar": False, "tensorboard": False, "batch_size": 8,
                          "learning_rate": 1e-2, "seed": 3, **overrides})


class ScriptedMetric:
    """An eval_fn whose metric is a fixed value per update (so the best evaluation is known in advance),
    recording the weights it was shown at each update."""

    def __init__(self, values_by_step: dict[int, float], name: str = "score"):
        self.values_by_step, self.name = values_by_step, name
        self.trainer: Trainer | None = None
        self.weights_seen: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, model) -> dict[str, float]:
        step = self.trainer.step
        self.weights_seen[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {self.name: self.values_by_step[step], "other": 0.0}


def trainer_with(folder, metric: ScriptedMetric, trainer_class=Trainer, **overrides) -> Trainer:
    torch.manual_seed(0)  # the same initial weights in every run
    trainer = trainer_class(ToyModel(), ToyDataset(64), config(folder, **overrides), eval_fn=metric)
    metric.trainer = trainer
    return trainer


def saved_best(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / BEST_MODEL_DIR / FINAL_WEIGHTS_NAME, weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_model_best_holds_the_weights_of_the_best_evaluation(tmp_path):
    # evaluations at 2, 4, 6, 8 and at the last update (9); the best is at 6
    metric = ScriptedMetric({2: 1.0, 4: 3.0, 6: 5.0, 8: 4.0, 9: 2.0})
    trainer = trainer_with(tmp_path, metric, max_steps=9, eval_every=2, best_metric="score", ema_decay=0.5)
    result = trainer.fit()
    assert [e["step"] for e in result.eval_history] == [2, 4, 6, 8, 9]
    assert result.best == {"metric": "score", "mode": "max", "value": 5.0, "step": 6}
    # the (EMA) weights the evaluation at update 6 scored, not the last ones
    assert_same_weights(saved_best(tmp_path), metric.weights_seen[6])
    assert not torch.equal(metric.weights_seen[6]["head.weight"], metric.weights_seen[9]["head.weight"])
    assert leftover_temporaries(tmp_path) == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_losses_and_ranks_are_better_low_unless_best_mode_says_otherwise(tmp_path):
    values = {2: 3.0, 4: 1.0, 6: 2.0}
    low = trainer_with(tmp_path / "low", ScriptedMetric(values, "val_loss"), max_steps=6, eval_every=2,
                       best_metric="val_loss").fit()
    assert low.best["mode"] == "min" and low.best["step"] == 4
    high = trainer_with(tmp_path / "high", ScriptedMetric(values, "val_loss"), max_steps=6, eval_every=2,
                        best_metric="val_loss", best_mode="max").fit()
    assert high.best["step"] == 2


def test_early_stopping_ends_the_run_after_patience_evaluations_without_improvement(tmp_path):
    # best at 4; 6 and 8 do not beat it (8 only ties): with patience 2 the run ends at update 8 of 30
    metric = ScriptedMetric({2: 1.0, 4: 2.0, 6: 1.5, 8: 2.0})
    result = trainer_with(tmp_path, metric, max_steps=30, eval_every=2, best_metric="score",
                          early_stopping_patience=2).fit()
    assert result.step == 8 and result.stopped_early
    assert len(result.loss_history) == 8
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 8
    assert result.best["step"] == 4
    assert_same_weights(saved_best(tmp_path), metric.weights_seen[4])


def test_a_run_that_keeps_improving_is_not_stopped(tmp_path):
    metric = ScriptedMetric({step: float(step) for step in range(2, 11, 2)})
    result = trainer_with(tmp_path, metric, max_steps=10, eval_every=2, best_metric="score",
                          early_stopping_patience=1).fit()
    assert result.step == 10 and not result.stopped_early


class StopAfterCheckpoint(Trainer):
    """Dies (an exception, like a pre-emption) right after the checkpoint of one update."""

    stop_after_step = 6

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == self.stop_after_step:
            raise KeyboardInterrupt("pre-empted")
        return path


def test_resume_keeps_the_best_model_and_the_early_stopping_counter(tmp_path):
    # best at 4; the checkpoint at 6 holds one evaluation without improvement, so with patience 2 the
    # run must stop at 8, keeping model_best from update 4 (not the first evaluation after the resume)
    values = {2: 1.0, 4: 2.0, 6: 1.5, 8: 1.8, 10: 9.0}
    settings = dict(max_steps=12, eval_every=2, save_every=3, best_metric="score", early_stopping_patience=2)
    reference = trainer_with(tmp_path / "reference", ScriptedMetric(values), **settings).fit()
    assert reference.step == 8

    folder = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        trainer_with(folder, ScriptedMetric(values), trainer_class=StopAfterCheckpoint, **settings).fit()
    metric = ScriptedMetric(values)
    resumed = trainer_with(folder, metric, **settings).fit(resume=True)
    assert resumed.step == 8 and resumed.stopped_early
    assert resumed.best == reference.best
    assert resumed.loss_history == reference.loss_history
    assert resumed.eval_history == reference.eval_history
    assert_same_weights(saved_best(folder), saved_best(tmp_path / "reference"))


def test_a_failed_best_save_keeps_the_previous_model_best(tmp_path):
    calls = []

    def save_best(model, folder):
        calls.append(1)
        torch.save(model.state_dict(), folder / FINAL_WEIGHTS_NAME)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    metric = ScriptedMetric({2: 1.0, 4: 2.0})
    torch.manual_seed(0)
    trainer = Trainer(ToyModel(), ToyDataset(64), config(tmp_path, max_steps=4, eval_every=2, best_metric="score"),
                      eval_fn=metric, save_best=save_best)
    metric.trainer = trainer
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    assert_same_weights(saved_best(tmp_path), metric.weights_seen[2])
    assert trainer.best_step == 2  # the state still describes what is on disk
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_keep_checkpoints_keeps_the_last_k_and_checkpoint_pt_is_the_latest(tmp_path):
    result = trainer_with(tmp_path, ScriptedMetric({}), max_steps=9, save_every=2, keep_checkpoints=2).fit()
    numbered = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    assert numbered == ["checkpoint-8.pt", "checkpoint-9.pt"]  # 2, 4, 6 deleted; 9 is the final save
    latest = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert latest["step"] == 9 == result.step
    assert torch.load(tmp_path / "checkpoint-8.pt", weights_only=True)["step"] == 8
    assert leftover_temporaries(tmp_path) == []


def test_keep_checkpoints_resumes_from_the_latest_and_drops_checkpoints_of_the_abandoned_run(tmp_path):
    settings = dict(max_steps=10, save_every=2, keep_checkpoints=3)
    reference = trainer_with(tmp_path / "reference", ScriptedMetric({}), **settings).fit()
    folder = tmp_path / "run"

    class Stop(StopAfterCheckpoint):
        stop_after_step = 6

    with pytest.raises(KeyboardInterrupt):
        trainer_with(folder, ScriptedMetric({}), trainer_class=Stop, **settings).fit()
    # as if the killed run had written a later checkpoint that never became checkpoint.pt
    (folder / "checkpoint-9.pt").write_bytes(b"from the abandoned run")
    resumed = trainer_with(folder, ScriptedMetric({}), **settings).fit(resume=True)
    assert resumed.loss_history == reference.loss_history
    assert sorted(p.name for p in folder.glob("checkpoint-*.pt")) == ["checkpoint-10.pt", "checkpoint-6.pt",
                                                                      "checkpoint-8.pt"]


def test_without_a_progress_bar_a_loss_line_is_logged_every_log_every_updates(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="interbert.train")
    metric = ScriptedMetric({3: 0.5, 6: 0.7})
    trainer_with(tmp_path, metric, max_steps=6, log_every=2, eval_every=3, best_metric="score").fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("update ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert "loss " in lines[0] and "(penalty_loss " in lines[0] and "regression_loss " in lines[0]
    assert " | lr " in lines[0] and lines[0].endswith("examples/s")
    validation = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation at update")]
    assert validation == ["validation at update 3: score 0.5 other 0 (new best)",
                          "validation at update 6: score 0.7 other 0 (new best)"]


def test_with_a_progress_bar_no_loss_lines_are_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="interbert.train")
    trainer_with(tmp_path, ScriptedMetric({}), max_steps=4, log_every=1, progress_bar=True).fit()
    assert not [r for r in caplog.records if r.getMessage().startswith("update ")]


def test_evaluations_are_in_the_history_file_as_they_happen(tmp_path):
    import json

    trainer_with(tmp_path, ScriptedMetric({2: 1.0, 4: 2.0}), max_steps=4, eval_every=2).fit()
    history = json.loads((tmp_path / HISTORY_NAME).read_text())
    assert history["eval"] == [{"step": 2, "score": 1.0, "other": 0.0}, {"step": 4, "score": 2.0, "other": 0.0}]
    assert not (tmp_path / BEST_MODEL_DIR).exists()  # no best_metric: no model_best


@pytest.mark.parametrize("settings, message", [
    ({"keep_checkpoints": 0}, "keep_checkpoints must be >= 1"),
    ({"early_stopping_patience": 0, "eval_every": 2}, "early_stopping_patience must be >= 1"),
    ({"best_metric": "score"}, "best_metric needs eval_every"),
    ({"best_mode": "highest"}, "best_mode must be max, min"),
])
def test_bad_watch_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **settings)


def test_best_metric_the_evaluation_does_not_report_is_named(tmp_path):
    trainer = trainer_with(tmp_path, ScriptedMetric({2: 1.0}), max_steps=2, eval_every=2, best_metric="ir_r1")
    with pytest.raises(ValueError, match="best_metric 'ir_r1' is not among the evaluation's metrics"):
        trainer.fit()
