"""YAML config files with dotted key=value overrides, and the committed training configs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from interbert.train import TrainConfig
from interbert.utils import ConfigError, add_config_arguments, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

EXAMPLE = """
model:
  preset: tiny
  dropout: 0.1
train:
  learning_rate: 1.0e-4
  max_steps: 100
  ema_decay: null
  lr_multipliers: {}
"""


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(EXAMPLE)
    return path


def test_overrides_replace_nested_values_parsed_as_yaml(config_file):
    config = load_config(
        config_file,
        ["train.learning_rate=2e-4", "train.max_steps=7", "train.ema_decay=0.999", "model.preset=base",
         "train.lr_multipliers={'bert.*': 0.1}"],
    )
    assert config["train"]["learning_rate"] == 2e-4  # "1e-4" is a float, not YAML 1.1's string
    assert config["train"]["max_steps"] == 7
    assert config["train"]["ema_decay"] == 0.999
    assert config["train"]["lr_multipliers"] == {"bert.*": 0.1}
    assert config["model"] == {"preset": "base", "dropout": 0.1}
    assert load_config(config_file, ["train.ema_decay=null"])["train"]["ema_decay"] is None
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=x=y") == (["a"], "x=y")


def test_unknown_key_is_an_error_naming_it(config_file):
    with pytest.raises(ConfigError, match="unknown config key 'train.lerning_rate'.*known keys here: .*learning_rate"):
        load_config(config_file, ["train.lerning_rate=1"])
    with pytest.raises(ConfigError, match="unknown config key 'optim'"):
        load_config(config_file, ["optim.lr=1"])
    with pytest.raises(ConfigError, match="'model.preset' is a str, not a mapping"):
        load_config(config_file, ["model.preset.size=1"])


def test_malformed_override_and_missing_file_are_clear_errors(config_file, tmp_path):
    with pytest.raises(ConfigError, match="not of the form dotted.key=value"):
        load_config(config_file, ["train.max_steps"])
    with pytest.raises(ConfigError, match="empty part"):
        load_config(config_file, ["train..max_steps=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: the top level must be a mapping"):
        load_config(bad)


def test_train_config_from_dict_rejects_unknown_settings():
    assert TrainConfig.from_dict({"learning_rate": 3e-4}).learning_rate == 3e-4
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['lerning_rate'\]"):
        TrainConfig.from_dict({"lerning_rate": 3e-4})
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)


def test_recipe_arguments_take_a_config_and_overrides(config_file):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(config_file), "train.max_steps=3"])
    assert load_config(args.config, args.overrides)["train"]["max_steps"] == 3


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_committed_configs_hold_a_valid_train_section(path):
    config = load_config(path)
    if "train" in config:
        TrainConfig.from_dict(config["train"])
