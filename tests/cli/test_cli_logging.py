"""Logging is the command line's to set up (issue 25): the library logs through its modules' loggers and
configures nothing, and the console set-up of ``interbert`` commands keeps faiss's loader lines out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_cli_logging_shows_our_info_lines_but_not_faiss_loader_noise():
    pytest.importorskip("faiss")
    done = run_python("import logging; from interbert.utils.logs import setup_cli_logging; setup_cli_logging(); "
                      "import faiss; logging.getLogger('interbert.train.loop').info('update 1/1')")
    assert "interbert.train.loop: update 1/1" in done.stderr
    assert "faiss" not in done.stderr and "AVX" not in done.stderr, done.stderr


def test_training_configures_no_logging_of_its_own(tmp_path):
    # a whole (tiny) run: the root logger still has no handler and the level the program left
    code = f"""
import logging, sys
import torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "train")!r})
from test_train_toy import ToyDataset, ToyModel
from interbert.train import TrainConfig, train
train(ToyModel(), ToyDataset(32), TrainConfig(output_dir={str(tmp_path)!r}, batch_size=8, max_steps=2,
      progress_bar=False, tensorboard=False, ema_decay=0.9))
root = logging.getLogger()
assert not root.handlers and root.level == logging.WARNING, (root.handlers, root.level)
assert all(not logging.getLogger(name).handlers for name in logging.root.manager.loggerDict
           if name.startswith("interbert")), "an interbert logger got a handler"
"""
    run_python(code)


def test_a_quieted_logger_gets_its_own_level_back_even_when_the_block_fails():
    import logging

    from interbert.utils.logs import quieted

    logger = logging.getLogger("interbert.tests.noisy")
    logger.setLevel(logging.INFO)
    with pytest.raises(RuntimeError), quieted("interbert.tests.noisy"):
        assert logger.level == logging.ERROR
        raise RuntimeError("the export failed")
    assert logger.level == logging.INFO
