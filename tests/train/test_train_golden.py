"""A short tiny pretraining run gives the per-step losses, learning rates and (EMA) weights recorded from
main before the training loop became a package (issue 25): the split must not change a single step.

The run goes through the real ``interbert pretrain`` path (trained vocabulary, TF-IDF negatives, group
masking) with what the loop does besides plain steps switched on: gradient accumulation, warm-up, EMA
with its decay warm-up, clipping, a checkpoint in the middle and keep-K."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import single_torch_thread

# Recorded with the code of main at 3fcbcab (train.py as one module), one torch thread.
EXPECTED_HISTORY = {
    "loss": [7.126041412353516, 7.092159271240234, 5.967020034790039, 9.025045394897461, 8.558055877685547,
             8.351661682128906],
    "msm_loss": [4.401004791259766, 4.401541709899902, 4.382002353668213, 4.374350547790527, 4.377493381500244,
                 4.355866432189941],
    "mrm_loss": [0.9252381324768066, 1.997515320777893, 0.8921563625335693, 1.893996000289917, 1.890781283378601,
                 1.852414608001709],
    "itm_loss": [0.6931806206703186, 0.6931023597717285, 0.6928609609603882, 0.6936302781105042,
                 0.6934251189231873, 0.6931040287017822],
    "itc_loss": [1.1066176891326904, 0.0, 0.0, 2.06306791305542, 1.5963553190231323, 1.450277328491211],
}
# warm-up over 2 updates, then linear decay over the remaining 4 (5e-4 is the tiny preset's rate)
EXPECTED_LR = [0.00025, 0.0005, 0.0005, 0.000375, 0.00025, 0.000125]
# (sum, sum of squares) of every floating tensor of the saved model: the EMA weights
EXPECTED_WEIGHTS = (511.321735828615, 564.0007111664298)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from interbert.cli import main

    data = tmp_path_factory.mktemp("golden") / "data"
    assert main(["data", "synth", str(data), "--images", "24", "--feature-dim", "16", "--num-classes", "8",
                 "--no-images", "--workers", "1"]) == 0
    return data


def pretrain_tiny(data, out, *extra: str) -> None:
    from interbert.cli import main

    with single_torch_thread():
        code = main(["pretrain", "--config", "pretrain_tiny", f"data.captions={data}/captions.json",
                     f"data.features={data}/regions.tsv", "data.vocab_size=80", f"train.output_dir={out}",
                     "train.max_steps=6", "train.batch_size=4", "train.grad_accum_steps=2", "train.warmup_steps=2",
                     "train.ema_decay=0.95", "train.save_every=3", "train.keep_checkpoints=1", "train.seed=5",
                     "train.progress_bar=false", "train.tensorboard=false", "threads=1",
                     "model.overrides.embedding_size=16", "model.overrides.hidden_size=32",
                     "model.overrides.intermediate_size=64", *extra])
    assert code == 0


def weight_summary(folder) -> tuple[float, float]:
    tensors = [t.double() for t in load_file(str(folder / "model.safetensors")).values() if t.is_floating_point()]
    return float(sum(t.sum() for t in tensors)), float(sum((t * t).sum() for t in tensors))


def test_tiny_pretraining_repeats_the_recorded_steps(tiny_data, tmp_path):
    pretrain_tiny(tiny_data, tmp_path / "run")
    history = json.loads((tmp_path / "run" / "loss_history.json").read_text())
    assert history["eval"] == [] and set(history) == {*EXPECTED_HISTORY, "lr", "eval"}
    for name, expected in EXPECTED_HISTORY.items():
        # a tolerance for other CPUs' summation order, far below what a changed step would move
        assert history[name] == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    assert history["lr"] == pytest.approx(EXPECTED_LR, rel=1e-12)
    assert weight_summary(tmp_path / "run" / "model") == pytest.approx(EXPECTED_WEIGHTS, rel=1e-6)
