"""A run killed with SIGKILL after a checkpoint and resumed gives the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

TOY_SCRIPT = Path(__file__).with_name("test_train_toy.py")

# 64 examples, batch 4, 2 micro-batches per update: 8 updates per epoch, so 12 updates cross an
# epoch boundary and the kill after update 5 lands in the middle of an epoch and of the schedule.
# Dropout, per-item torch noise, numpy noise in the collate function and EMA are all on.
RUN_ARGS = ["--max-steps", "12", "--batch-size", "4", "--grad-accum-steps", "2", "--save-every", "5",
            "--ema-decay", "0.9", "--warmup-steps", "3"]


def start_toy_run(output_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(TOY_SCRIPT), "--output-dir", str(output_dir), *RUN_ARGS, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tmp_path):
    uninterrupted = start_toy_run(tmp_path / "uninterrupted")
    killed = start_toy_run(tmp_path / "killed", "--kill-after-step", "5")
    code, output = finish(killed)
    assert code == -signal.SIGKILL, output
    assert (tmp_path / "killed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "killed" / "run_rank0.json").exists()  # it really died before the end

    code, output = finish(start_toy_run(tmp_path / "killed", "--resume"))
    assert code == 0, output
    code, output = finish(uninterrupted)
    assert code == 0, output

    reference = json.loads((tmp_path / "uninterrupted" / "run_rank0.json").read_text())["loss_history"]
    resumed = json.loads((tmp_path / "killed" / "run_rank0.json").read_text())["loss_history"]
    assert len(reference) == 12
    assert resumed[5:] == reference[5:]  # the updates after the kill: exactly equal
    assert resumed == reference
    reference_weights = torch.load(tmp_path / "uninterrupted" / "weights_rank0.pt", weights_only=True)
    resumed_weights = torch.load(tmp_path / "killed" / "weights_rank0.pt", weights_only=True)
    for name, value in reference_weights.items():
        assert torch.equal(value, resumed_weights[name]), name
