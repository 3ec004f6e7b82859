"""A checkpoint written before the training loop became a package (issue 25) still resumes, and the
resumed run continues with the losses and EMA weights the old code gave.

``fixtures/checkpoint_3fcbcab.pt`` was written by main at 3fcbcab (``train.py`` as one module, the
hand-written EMA with its ``decay/warmup/num_updates/shadow`` state) by :func:`write_fixture` after 3
of 6 updates; the constants below are that code's losses and final EMA weights of the whole run."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import single_torch_thread
from interbert.train import CHECKPOINT_NAME, FINAL_WEIGHTS_NAME, TrainConfig, Trainer
from test_train_toy import ToyDataset, ToyModel

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_3fcbcab.pt"
EXPECTED_LOSS = [23.36094856262207, 10.81516170501709, 5.869729042053223, 11.467979431152344, 7.458774566650391,
                 11.422916412353516]
EXPECTED_EMA = (13.567601038084831, 22.64222826846667)  # (sum, sum of squares) of the saved EMA weights after update 6


def toy_config(output_dir) -> TrainConfig:
    return TrainConfig(output_dir=str(output_dir), batch_size=8, grad_accum_steps=2, max_steps=6,
                       learning_rate=1e-2, warmup_steps=2, ema_decay=0.9, ema_warmup=True, seed=7,
                       save_every=3, keep_checkpoints=2, progress_bar=False, tensorboard=False)


def run(output_dir, resume: bool = False):
    torch.manual_seed(0)
    with single_torch_thread():
        return Trainer(ToyModel(), ToyDataset(64), toy_config(output_dir)).fit(resume=resume)


def weight_summary(path) -> tuple[float, float]:
    tensors = [t.double() for t in torch.load(path, weights_only=True).values() if t.is_floating_point()]
    return float(sum(t.sum() for t in tensors)), float(sum((t * t).sum() for t in tensors))


def write_fixture(folder: Path) -> None:
    """What wrote the fixture (run with the code of 3fcbcab): the toy run, its checkpoint after update 3."""
    result = run(folder)
    print(result.history["loss"], weight_summary(folder / FINAL_WEIGHTS_NAME))
    shutil.copy(folder / "checkpoint-3.pt", FIXTURE)


def test_a_checkpoint_of_the_old_format_resumes_to_the_same_losses_and_ema(tmp_path):
    state = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    assert set(state["ema"]) == {"decay", "warmup", "num_updates", "shadow"} and state["step"] == 3
    shutil.copy(FIXTURE, tmp_path / CHECKPOINT_NAME)
    result = run(tmp_path, resume=True)
    assert result.history["loss"] == pytest.approx(EXPECTED_LOSS, rel=1e-6)
    assert weight_summary(tmp_path / FINAL_WEIGHTS_NAME) == pytest.approx(EXPECTED_EMA, rel=1e-7)


def test_the_uninterrupted_run_gives_the_recorded_losses(tmp_path):
    result = run(tmp_path)
    assert result.history["loss"] == pytest.approx(EXPECTED_LOSS, rel=1e-6)
    assert weight_summary(tmp_path / FINAL_WEIGHTS_NAME) == pytest.approx(EXPECTED_EMA, rel=1e-7)


if __name__ == "__main__":
    write_fixture(Path(sys.argv[1]))
