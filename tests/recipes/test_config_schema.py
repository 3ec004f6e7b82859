"""Typed recipe settings: every setting overridable, unknown keys and bad values refused by name,
``--print-config`` round trips, model overrides checked by InterBertConfig, dicts coerced alike."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from interbert.recipes.settings import RECIPES, PretrainSettings, RetrievalSettings, VcrSettings
from interbert.utils.config_files import ConfigError
from interbert.utils.typed_config import CHOICES, dotted_keys

SHIPPED = {"pretrain": "pretrain_tiny", "finetune retrieval": "finetune_retrieval_tiny",
           "finetune vcr": "finetune_vcr_tiny", "finetune text": "finetune_text_tiny"}

# a value for the free-form mappings (key.*), and for settings whose valid values a type cannot say
SPECIAL = {
    "model.overrides.*": ("model.overrides.hidden_dropout_prob", 0.25),
    "model.config_updates.*": ("model.config_updates.itc_loss_weight", 0.0),
    "train.lr_multipliers.*": ("train.lr_multipliers.interbert.text_stream.*", 0.1),  # dots in a pattern
    "train.best_mode": ("train.best_mode", "min"),
    "data.tasks": ("data.tasks", ["QA->R"]),
    "data.sources": ("data.sources", [{"name": "a", "captions": "a.json", "features": "a.tsv"}]),
    "data.length_buckets": ("data.length_buckets", [16, 24, 32]),  # none | auto | ascending edges
    "data.region_buckets": ("data.region_buckets", "auto"),
    "train.report_to": ("train.report_to", ["tensorboard", "mlflow"]),  # a list of tracker names
}
NEEDS = {"train.best_metric": ["train.eval_every=5"], "train.early_stopping_patience": ["train.eval_every=5"],
         "data.sources": ["data.captions=null", "data.features=null"],
         "train.fp16": ["train.bf16=false"]}  # one half-precision kind at a time


def _field(settings_class: type, key: str) -> tuple[typing.Any, dataclasses.Field, typing.Any]:
    """(the section's default instance, the field, its annotation) of a dotted key."""
    *sections, name = key.split(".")
    kind = settings_class
    for part in sections:
        kind = typing.get_type_hints(kind)[part]
    field = {f.name: f for f in dataclasses.fields(kind)}[name]
    return kind(), field, typing.get_type_hints(kind)[name]


def _other_value(settings_class: type, key: str):
    """A valid value of ``key`` that differs from its default."""
    section, field, annotation = _field(settings_class, key)
    default = getattr(section, field.name)
    if field.metadata.get(CHOICES):
        return next(option for option in field.metadata[CHOICES] if option != default and option is not None)
    kinds = [k for k in typing.get_args(annotation) or (annotation,) if k is not type(None)]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    if kind is bool:
        return not default
    if kind is int:
        return 7 if default is None else default + 1
    if kind is float:
        return 0.5 if default != 0.5 else 0.25
    if kind is str:
        return "some/path" if default != "some/path" else "other/path"
    raise AssertionError(f"no test value for {key}: {annotation}")


def _cases():
    for recipe, settings_class in RECIPES.items():
        for key in dotted_keys(settings_class):
            if key in SPECIAL:
                dotted, value = SPECIAL[key]
            else:
                dotted, value = key, _other_value(settings_class, key)
            yield pytest.param(recipe, dotted, value, id=f"{recipe.replace(' ', '_')}:{dotted}")


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@pytest.mark.parametrize("recipe, key, value", list(_cases()))
def test_every_setting_can_be_overridden_from_the_command_line(recipe, key, value):
    settings_class = RECIPES[recipe]
    settings = settings_class.load(SHIPPED[recipe], [*NEEDS.get(key, []), f"{key}={_yaml(value)}"])
    node = settings
    free_form = next((k for k in ("model.overrides.", "model.config_updates.", "train.lr_multipliers.")
                      if key.startswith(k)), None)
    path = key.split(".") if free_form is None else [*free_form.strip(".").split("."), key[len(free_form):]]
    for part in path:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    assert node == value and type(node) is type(value)


def test_every_train_config_field_is_a_setting_of_every_recipe():
    from interbert.train import TrainConfig

    for settings_class in RECIPES.values():
        keys = dotted_keys(settings_class)
        for name in TrainConfig.field_names():
            assert f"train.{name}" in keys or f"train.{name}.*" in keys


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_an_unknown_key_is_refused_with_the_valid_ones_listed(recipe, tmp_path):
    settings_class = RECIPES[recipe]
    with pytest.raises(ConfigError, match=r"unknown config key 'data.no_such_key' in override 'data.no_such_key=1'; "
                                          r"known keys here: .*tokenizer, vocab_size.*max_tokens"):
        settings_class.load(SHIPPED[recipe], ["data.no_such_key=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*known keys here: model, data, train, threads"):
        settings_class.load(SHIPPED[recipe], ["trian.max_steps=1"])
    typo = tmp_path / "typo.yaml"  # in a file as well as in an override
    typo.write_text("train:\n  lerning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"{typo}: unknown config key 'train.lerning_rate'; known keys here: .*learning_rate"):
        settings_class.load(typo)
    with pytest.raises(ConfigError, match=r"unknown config key 'data.no_such_key'"):  # a dict from Python too
        settings_class.coerce({"data": {"no_such_key": 1}})


@pytest.mark.parametrize("override, message", [
    ("data.max_tokens=many", "data.max_tokens must be int, got 'many'"),
    ("data.max_tokens=2.5", "data.max_tokens must be int, got 2.5"),
    ("data.verify_features=maybe", "data.verify_features must be bool, got 'maybe'"),
    ("data.hard_ratio=[1]", r"data.hard_ratio must be float, got \[1\]"),
    ("train.bf16=yes please", "train.bf16 must be bool, got 'yes please'"),
    ("train.max_steps=true", "train.max_steps must be int or null, got True"),
    ("train.lr_multipliers.bert.*=fast", r"train.lr_multipliers.bert.\* must be float, got 'fast'"),
    ("data.negatives=hard", "data.negatives must be one of tfidf, random, in_batch, not 'hard'"),
    ("data.region_cache=sometimes", "data.region_cache must be one of True, False, auto, not 'sometimes'"),
    ("model.preset=huge", "model.preset must be one of base, small, tiny, not 'huge'"),
    ("data.max_regions=0", "data.max_regions must be a whole number >= 1, not 0"),
    ("threads=two", "threads must be a whole number >= 1"),
    ("model.preset.size=1", "cannot override 'model.preset.size': 'model.preset' is a str, not a mapping"),
])
def test_a_bad_value_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=r"pretrain_tiny.yaml: " + message):
        PretrainSettings.load("pretrain_tiny", [override])


@pytest.mark.parametrize("override, message", [
    ("model.overrides.hidden_sise=64", "model.overrides.hidden_sise is not an InterBertConfig field; its fields: "
                                       "vocab_size, hidden_size"),
    ("model.overrides.hidden_size=wide", "model.overrides.hidden_size must be int, got 'wide'"),
    ("model.overrides.fusion=concat", "model.overrides: fusion must be one of"),  # InterBertConfig.validate
    ("model.overrides.num_attention_heads=5", "hidden_size 128 is not a multiple of num_attention_heads 5"),
    ("model.overrides.itm_negative_ratio=2", r"itm_negative_ratio must be in \[0, 1\]"),
    ("model.config_updates.itc_los_weight=0", "model.config_updates.itc_los_weight is not an InterBertConfig field"),
])
def test_model_overrides_are_checked_by_interbert_config(override, message):
    with pytest.raises(ConfigError, match=message):
        RetrievalSettings.load("finetune_retrieval_tiny", [override])


def test_config_updates_build_the_loaded_model_from_a_validated_config(tmp_path):
    from interbert.config import preset
    from interbert.errors import UsageError
    from interbert.loading import load_model
    from interbert.modeling import InterBertForPreTraining

    config = preset("tiny", vocab_size=50, hidden_size=32, num_attention_heads=2, image_num_attention_heads=2,
                    intermediate_size=32, image_intermediate_size=32, region_feature_size=8, num_region_classes=5,
                    itc_loss_weight=1.0, embedding_size=8)
    InterBertForPreTraining(config).save_pretrained(tmp_path / "model")
    model = load_model(tmp_path / "model", task="retrieval", config_updates={"itc_loss_weight": 0.0})
    assert model.config.itc_loss_weight == 0.0
    assert load_model(tmp_path / "model", task="pretraining").config.itc_loss_weight == 1.0  # the folder unchanged
    with pytest.raises(UsageError, match=r"itm_negative_ratio must be in \[0, 1\]"):
        load_model(tmp_path / "model", task="retrieval", config_updates={"itm_negative_ratio": 3.0})
    with pytest.raises(UsageError, match="no_such_field is not a field"):
        load_model(tmp_path / "model", task="retrieval", config_updates={"no_such_field": 3.0})


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_print_config_round_trips(recipe, tmp_path, capsys):
    from interbert.cli import main

    overrides = ["train.max_steps=9", "train.learning_rate=3e-5", "model.overrides.hidden_dropout_prob=0.2",
                 "train.lr_multipliers.interbert.text_stream.*=0.5", "data.tokenizer='1e-4'", "threads=2"]
    assert main([*recipe.split(), "--print-config", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 9" in printed and "hidden_dropout_prob: 0.2" in printed
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed)
    assert main([*recipe.split(), "--print-config", "--config", str(saved)]) == 0
    assert capsys.readouterr().out == printed
    settings_class = RECIPES[recipe]
    resolved = settings_class.load(saved)
    assert resolved == settings_class.load(SHIPPED[recipe], overrides)  # the same run
    assert resolved.data.tokenizer == "1e-4"  # a string that looks like a number stays a string


def test_help_points_to_print_config(capsys):
    from interbert.cli import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--print-config" in out and "every field of the training loop's TrainConfig" in out


def test_a_dict_gets_the_schema_defaults_and_checks():
    settings = PretrainSettings.coerce({"data": {"captions": "c.json", "features": "f.tsv"}, "train": {"max_steps": 3}})
    assert (settings.data.num_hard, settings.data.msm, settings.data.region_cache) == (10, "span", "auto")
    assert settings.train.max_steps == 3 and settings.train.learning_rate == 1e-4  # TrainConfig's default
    assert PretrainSettings.coerce(settings) is settings
    with pytest.raises(ConfigError, match="data.tasks must be a list of Q->A, QA->R"):
        VcrSettings.coerce({"data": {"tasks": ["Q->X"]}})
    assert RetrievalSettings.coerce({}).data.num_hard == 100  # each recipe its own defaults


def test_shipped_configs_state_only_what_differs_or_documents():
    """The shipped YAMLs and the schema agree on which file belongs to which recipe, and each loads."""
    for recipe, name in SHIPPED.items():
        settings = RECIPES[recipe].load(name)
        assert settings.train.output_dir == f"runs/{name}"
        assert settings.data.vocab_size == 1000  # the tiny choice (the schema's default is BERT's 30522)


def test_a_whole_number_given_to_a_name_setting_is_that_name():
    """``data.split=2014`` names a split; YAML reads the text as a number, the setting keeps it as text."""
    settings = PretrainSettings.load("pretrain_tiny", ["data.split=2014"])
    assert settings.data.split == "2014"
    with pytest.raises(ConfigError, match="data.split must be"):  # a float would not round-trip as written
        PretrainSettings.load("pretrain_tiny", ["data.split=1e3"])


def test_model_overrides_change_a_loaded_checkpoint_except_its_sizes(tmp_path, caplog):
    """`model.overrides` with `model.from_checkpoint`: a field that does not fix the weights (dropout, a loss
    weight) changes the model every recipe loads; a size stays the checkpoint's, and saying so is one warning
    line naming the key (it used to be dropped without a word)."""
    from interbert.config import preset
    from interbert.modeling import InterBertForPreTraining
    from interbert.recipes import finetune_retrieval, text, vcr

    config = preset("tiny", vocab_size=50, hidden_size=32, num_attention_heads=2, image_num_attention_heads=2,
                    intermediate_size=32, image_intermediate_size=32, region_feature_size=8, num_region_classes=5,
                    itc_loss_weight=1.0, embedding_size=8)
    InterBertForPreTraining(config).save_pretrained(tmp_path / "model")
    overrides = [f"model.from_checkpoint={tmp_path / 'model'}", "model.overrides.hidden_dropout_prob=0.3",
                 "model.overrides.embedding_size=16"]
    settings = RetrievalSettings.load("finetune_retrieval_tiny", [*overrides, "model.config_updates.itc_loss_weight=0.5"])
    with caplog.at_level("WARNING"):
        model = finetune_retrieval.build_model(settings.model, None, None)
    assert model.config.hidden_dropout_prob == 0.3 and model.config.itc_loss_weight == 0.5
    assert model.config.embedding_size == 8 and model.interbert.text_projection.out_features == 8
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "embedding_size=8" in warned[0] and "embedding_size=16" in warned[0]

    text_settings = RECIPES["finetune text"].load("finetune_text_tiny", overrides)
    assert text.build_text_model(text_settings.model, None, 2).config.hidden_dropout_prob == 0.3
    vcr_settings = RECIPES["finetune vcr"].load("finetune_vcr_tiny", overrides)
    assert vcr.build_vcr_model(vcr_settings.model, None, 8).config.hidden_dropout_prob == 0.3
