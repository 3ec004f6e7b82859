"""Two processes under torchrun (gloo on CPU) train the toy in lock-step on disjoint shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TOY_SCRIPT = Path(__file__).with_name("test_train_toy.py")


def test_two_process_torchrun_keeps_ranks_identical_on_disjoint_shards(tmp_path):
    # PYTHONFAULTHANDLER: should a rank abort inside C++ (gloo), its Python stack is printed below
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        str(TOY_SCRIPT), "--output-dir", str(tmp_path), "--max-steps", "4", "--batch-size", "4",
        "--dataset-size", "32", "--save-every", "2",
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert completed.returncode == 0, f"files written: {written}\n" + completed.stdout + completed.stderr

    weights = [torch.load(tmp_path / f"weights_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), f"ranks differ in {name}"
    torch.manual_seed(0)
    from test_train_toy import ToyModel

    initial = ToyModel().state_dict()
    assert not torch.equal(initial["head.weight"], weights[0]["head.weight"])  # it did train

    runs = [json.loads((tmp_path / f"run_rank{rank}.json").read_text()) for rank in (0, 1)]
    seen = [set(run["seen"]) for run in runs]
    assert len(runs[0]["seen"]) == len(runs[1]["seen"]) == 16  # 4 updates x batch 4 per rank
    assert not seen[0] & seen[1], "the ranks read the same examples"
    assert seen[0] | seen[1] == set(range(32))  # one epoch of 32 examples split in two shards
    assert runs[0]["loss_history"] == runs[1]["loss_history"]  # the logged loss is the mean over ranks

    # only rank 0 writes: one checkpoint, one TensorBoard event file
    assert (tmp_path / "checkpoint.pt").is_file()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_states"]) == 2
