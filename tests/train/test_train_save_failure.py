"""A checkpoint save that fails (full disk mid-write, a failed rename) keeps the previous checkpoint,
leaves no temporary file, and the run resumes from that checkpoint to the uninterrupted run's losses."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from interbert.train import CHECKPOINT_NAME, TrainConfig, train
from interbert.utils import files
from interbert.utils.files import leftover_temporaries
from test_train_toy import ToyDataset, ToyModel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(folder, **overrides) -> TrainConfig:
    # A checkpoint after update 2 and one at the end (update 4): the test lets the first succeed.
    return TrainConfig(output_dir=str(folder), progress_bar=False, tensorboard=False, batch_size=8, max_steps=4,
                       save_every=2, **overrides)


def toy_model() -> ToyModel:
    torch.manual_seed(0)  # the same initial weights in every run
    return ToyModel()


def full_disk(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def fail_second_checkpoint_write(monkeypatch):
    """torch.save writes part of the second checkpoint, then the disk is full."""
    real_save, calls = torch.save, []

    def save(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:
            calls.append(1)
            if len(calls) == 2:
                handle.write(b"PK\x03\x04 half a zip file")
                full_disk()
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def fail_second_checkpoint_rename(monkeypatch):
    real_replace, calls = os.replace, []

    def replace(src, dst):
        if os.path.basename(dst) == CHECKPOINT_NAME:
            calls.append(1)
            if len(calls) == 2:
                full_disk()
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)


@pytest.mark.parametrize("fail", [fail_second_checkpoint_write, fail_second_checkpoint_rename])
def test_a_failed_checkpoint_save_keeps_the_previous_checkpoint_and_the_run_resumes(tmp_path, monkeypatch, fail):
    reference = train(toy_model(), ToyDataset(64), config(tmp_path / "uninterrupted"))

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        fail(patched)
        with pytest.raises(OSError, match="No space left"):
            train(toy_model(), ToyDataset(64), config(run))
    assert leftover_temporaries(run) == []
    assert not [p.name for p in run.iterdir() if "tmp" in p.name]
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["step"] == 2  # the previous one, intact

    resumed = train(toy_model(), ToyDataset(64), config(run), resume=True)
    assert resumed.loss_history == reference.loss_history
