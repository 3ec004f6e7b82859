"""The paper-scale configs (pretrain_base, finetune_retrieval_base): the authors' settings, their required
settings refused by name, and a one-step run of each through the real CLI at `base` size on the image side,
with the MiniLM checkpoint standing in for BERT-base (the text side's sizes come from the BERT folder)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import minilm_dir
from interbert.cli import main
from interbert.recipes.settings import PretrainSettings, RetrievalSettings


def test_base_configs_hold_the_authors_settings():
    pretrain = PretrainSettings.load("pretrain_base")
    train = pretrain.train
    assert pretrain.model.preset == "base" and pretrain.model.overrides == {} and pretrain.model.from_bert == "???"
    assert train.batch_size * train.grad_accum_steps == 512 and train.learning_rate == 1e-4
    assert (train.num_epochs, train.warmup_ratio, train.bf16, train.fp16) == (15, 0.1, True, False)
    assert (pretrain.data.msm, pretrain.data.mrm, pretrain.data.negatives) == ("span", "group", "tfidf")

    finetune = RetrievalSettings.load("finetune_retrieval_base")
    train = finetune.train
    assert finetune.model.preset == "base"
    assert train.batch_size * train.grad_accum_steps == 64 and train.learning_rate == 4e-5
    assert (train.num_epochs, train.ema_decay, finetune.data.max_tokens) == (20, 0.9999, 30)
    # the switches for smaller or older GPUs are plain overrides
    switched = PretrainSettings.load("pretrain_base", ["train.gradient_checkpointing=true", "train.bf16=false",
                                                       "train.fp16=true"]).train
    assert switched.gradient_checkpointing and switched.fp16 and not switched.bf16


@pytest.mark.parametrize(("command", "config", "key"), [
    (["pretrain"], "pretrain_base", "model.from_bert"),
    (["finetune", "retrieval"], "finetune_retrieval_base", "model.from_checkpoint"),
])
def test_the_setting_a_base_config_cannot_default_is_required_by_name(command, config, key, capsys):
    assert main([*command, "--config", config, "data.captions=c.json", "data.features=f"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith(f"{config}.yaml: {key} is required (pass {key}=VALUE)")
    assert "\n" not in err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base_data")
    assert main(["data", "synth", str(folder), "--images", "24", "--feature-dim", "32", "--num-classes", "12",
                 "--no-images", "--workers", "1"]) == 0
    return folder


@pytest.mark.slow  # ~10 s of CPU, 30 s on the shared machine: two base-width image stacks
def test_one_step_of_each_base_config_at_base_size(data, tmp_path, one_torch_thread):
    bert = minilm_dir()
    common = [f"data.captions={data / 'captions.json'}", f"data.features={data / 'regions.tsv'}",
              "train.max_steps=1", "train.batch_size=2", "train.grad_accum_steps=1", "train.device=cpu",
              "train.num_workers=0", "train.save_every=null", "train.progress_bar=false", "train.tensorboard=false",
              "train.gradient_checkpointing=true", "data.max_regions=8", "data.verify_features=false"]
    pretrained = tmp_path / "pretrain"
    assert main(["pretrain", "--config", "pretrain_base", f"model.from_bert={bert}", f"train.output_dir={pretrained}",
                 "data.num_hard=3", *common]) == 0
    config = json.loads((pretrained / "model" / "config.json").read_text())
    bert_config = json.loads((bert / "config.json").read_text())
    # the image side at the paper's size, the text side BERT's (MiniLM here: 6 layers split 3 + 3, hidden 384)
    assert (config["num_image_stream_layers"], config["image_intermediate_size"], config["pooled_size"]) == (6, 3072, 1024)
    assert config["hidden_size"] == bert_config["hidden_size"]
    assert config["num_single_stream_layers"] + config["num_text_stream_layers"] == bert_config["num_hidden_layers"]
    history = json.loads((pretrained / "loss_history.json").read_text())
    assert len(history["loss"]) == 1 and torch.isfinite(torch.tensor(history["loss"])).all()

    finetuned = tmp_path / "finetune"
    assert main(["finetune", "retrieval", "--config", "finetune_retrieval_base",
                 f"model.from_checkpoint={pretrained / 'model'}", f"train.output_dir={finetuned}", "data.num_hard=3",
                 *common]) == 0
    assert json.loads((finetuned / "model" / "config.json").read_text())["architectures"] == ["InterBertForImageTextRetrieval"]
