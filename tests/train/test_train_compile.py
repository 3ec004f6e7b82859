"""``train.compile`` (issue 26): the setting's validation (fast), and a compiled tiny pretraining run whose
losses are the eager run's (slow: inductor compiles on the CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_toy import ToyDataset, ToyModel  # noqa: E402

from interbert.errors import UsageError  # noqa: E402
from interbert.recipes.settings import PretrainSettings  # noqa: E402
from interbert.train import Trainer, TrainConfig  # noqa: E402
from interbert.utils import typed_config  # noqa: E402
from interbert.utils.config_files import ConfigError  # noqa: E402


def test_compile_is_off_by_default_and_takes_torch_compile_modes():
    assert TrainConfig().compile == "off"
    for mode in ("off", "default", "reduce-overhead", "max-autotune"):
        assert TrainConfig(compile=mode).compile == mode
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="fast")
    with pytest.raises(ConfigError, match=r"train\.compile must be one of"):
        typed_config.from_dict(PretrainSettings, {"train": {"compile": "fast"}})
    with pytest.raises(ConfigError, match=r"train\.compile"):
        typed_config.from_dict(PretrainSettings, {"train": {"compile": True}})


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_modes_are_refused_on_the_cpu_with_one_line_naming_the_key(mode, tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), compile=mode, device="cpu", max_steps=1, batch_size=4,
                         progress_bar=False, tensorboard=False)
    with pytest.raises(UsageError) as refused:
        Trainer(ToyModel(), ToyDataset(16), config)
    message = str(refused.value)
    assert f"train.compile={mode}" in message and "\n" not in message


def test_compile_default_wraps_the_model_in_its_static_shape_mode(tmp_path):
    from interbert.modeling import InterBertForPreTraining
    from test_modeling import small_config

    model = InterBertForPreTraining(small_config())
    config = TrainConfig(output_dir=str(tmp_path), compile="default", device="cpu", max_steps=1, batch_size=4,
                         progress_bar=False, tensorboard=False)
    trainer = Trainer(model, ToyDataset(16), config)
    assert trainer.model is model and model.static_shapes and model.interbert.static_shapes
    assert trainer.ddp_model is not model  # the compiled wrapper; saving and EMA keep reading the bare module
    # every bucket shape (and the MSM budget's full-size one) compiles, not eager after dynamo's default 8
    import torch

    from interbert.train.compiling import RECOMPILE_LIMIT
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT >= 4 * 4 * 2
    off = Trainer(InterBertForPreTraining(small_config()), ToyDataset(16),
                  TrainConfig(output_dir=str(tmp_path / "off"), device="cpu", max_steps=1, batch_size=4))
    assert not off.model.static_shapes and off.ddp_model is off.model and off.compile_seconds is None


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from interbert.cli import main

    data = tmp_path_factory.mktemp("compile") / "data"
    assert main(["data", "synth", str(data), "--images", "24", "--feature-dim", "16", "--num-classes", "8",
                 "--no-images", "--workers", "1"]) == 0
    return data


def _pretrain(data, out, buckets: str = "none", **train) -> dict:
    from conftest import single_torch_thread
    from interbert.recipes import pretrain
    from interbert.utils import load_config

    cfg = load_config("pretrain_tiny")
    cfg["data"].update(captions=f"{data}/captions.json", features=f"{data}/regions.tsv", vocab_size=80,
                       length_buckets=buckets, region_buckets=buckets)
    cfg["model"]["overrides"].update(embedding_size=16, hidden_size=32, intermediate_size=64)
    cfg["train"].update(output_dir=str(out), max_steps=3, batch_size=4, seed=5, progress_bar=False,
                        tensorboard=False, save_every=None, **train)
    cfg["threads"] = 1
    with single_torch_thread():
        return pretrain.run(cfg)


@pytest.mark.slow
def test_three_compiled_tiny_pretraining_steps_give_the_eager_losses(tiny_data, tmp_path):
    eager = _pretrain(tiny_data, tmp_path / "eager")
    compiled = _pretrain(tiny_data, tmp_path / "compiled", compile="default", buckets="auto")
    assert eager["compile_seconds"] is None and compiled["compile_seconds"] > 0
    for name, series in eager["history"].items():
        assert compiled["history"][name] == pytest.approx(series, rel=1e-5, abs=1e-5), name
    history = json.loads((tmp_path / "compiled" / "loss_history.json").read_text())
    assert history["loss"] == pytest.approx(eager["history"]["loss"], rel=1e-5)
