"""YAML config files with dotted key=value overrides, and the committed training configs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from interbert.train import TrainConfig
from interbert.utils import ConfigError, add_config_arguments, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

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
    with pytest.raises(ValueError, match=r"unknown config key 'train.lerning_rate'; known keys here: .*learning_rate"):
        TrainConfig.from_dict({"lerning_rate": 3e-4})
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)


def test_optional_keys_may_be_set_although_the_file_leaves_them_out(config_file):
    optional = {"train": ["find_unused_parameters", "warmup_steps"]}
    config = load_config(config_file, ["train.find_unused_parameters=true"], optional_keys=optional)
    assert config["train"]["find_unused_parameters"] is True
    assert "warmup_steps" not in config["train"]  # not overridden: left to the default, not filled in
    with pytest.raises(ConfigError, match="unknown config key 'train.find_unused_parameters'"):
        load_config(config_file, ["train.find_unused_parameters=true"])  # not declared optional
    # a typo is still refused, naming the file's keys and the optional ones
    with pytest.raises(ConfigError, match="unknown config key 'train.find_unused_parameter'.*known keys here: "
                                          "ema_decay, find_unused_parameters, learning_rate"):
        load_config(config_file, ["train.find_unused_parameter=true"], optional_keys=optional)
    with pytest.raises(ConfigError, match="unknown config key 'model.find_unused_parameters'"):
        load_config(config_file, ["model.find_unused_parameters=true"], optional_keys=optional)  # other section


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_accept_every_train_setting_as_a_typed_override(path):
    from interbert.recipes.common import load_recipe_config

    config = load_recipe_config(path, ["train.find_unused_parameters=true", "train.warmup_steps=3", "train.bf16=false",
                                       "train.adam_beta2=0.98", "train.eval_every=null"])
    train = TrainConfig.from_dict(config["train"])
    assert train.find_unused_parameters is True and train.bf16 is False  # booleans, not the strings
    assert (train.warmup_steps, train.adam_beta2, train.eval_every) == (3, 0.98, None)
    with pytest.raises(ConfigError, match=r"unknown config key 'train.find_unused'.*known keys here: .*find_unused_parameters"):
        load_recipe_config(path, ["train.find_unused=true"])
    for bad, message in (("find_unused_parameters=maybe", "find_unused_parameters must be bool, got 'maybe'"),
                         ("warmup_steps=2.5", "warmup_steps must be int, got 2.5"),
                         ("batch_size=true", "batch_size must be int, got True"),
                         ("max_grad_norm=big", "max_grad_norm must be float or null, got 'big'")):
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(load_recipe_config(path, [f"train.{bad}"])["train"])


def test_train_config_from_dict_converts_ints_to_floats_and_paths_to_str(tmp_path):
    config = TrainConfig.from_dict({"learning_rate": 1, "output_dir": tmp_path, "max_grad_norm": None})
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.output_dir == str(tmp_path) and config.max_grad_norm is None


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
