"""The demo's settings: one config per stage, read through the recipes' typed schema.

``configs/demo/`` holds a YAML file per stage: ``data.yaml`` (the built-in benchmark and the padding every
stage reads it with), ``pretrain.yaml`` and ``finetune.yaml`` (the ``data`` and ``train`` sections of the
``pretrain`` and ``finetune retrieval`` recipes, :mod:`interbert.recipes.settings`), ``evaluate.yaml`` and
``vcr.yaml``; ``demo.yaml`` holds what the stages share (the seed, the model). :func:`load_demo` reads
them into :class:`DemoSettings` with dotted ``key=value`` overrides (``pretrain.data.msm=token``), as a
recipe reads its file. The demo then hands each recipe its own settings (:func:`pretrain_settings`,
:func:`finetune_settings`), completed with what only the run knows: the benchmark's files, the output
folders, the pretrained model.

An ablation (``configs/demo/ablations.yaml``) is a label and a list of dotted overrides, so a variant is
the demo's settings with a few keys changed, and a finished run is recognised by its resolved settings
(:func:`same_config`).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from interbert.config import InterBertConfig, preset
from interbert.recipes.settings import (
    BertModelSettings,
    PretrainDataSettings,
    PretrainSettings,
    RetrievalDataSettings,
    RetrievalSettings,
)
from interbert.synthetic.detector import FEATURE_NOISE, MIN_GROUP_IOU, PROPOSALS_PER_OBJECT, DetectorKnobs, max_proposals
from interbert.synthetic.language import LANGUAGES
from interbert.train import TrainConfig
from interbert.utils import typed_config
from interbert.utils.config_files import ConfigError, read_config
from interbert.utils.typed_config import choice, section

# every dropout field of the model's config (hidden, attention, both streams, the ITM head)
DROPOUTS = tuple(name for name in inspect.signature(InterBertConfig.__init__).parameters if name.endswith("_dropout_prob"))


# ---- the schema ---------------------------------------------------------------------------------------
@dataclass
class DemoModelSettings(BertModelSettings):
    """The model pretraining builds, and fine-tuning w/o pretraining builds again."""

    dropout: float | None = None  # every *_dropout_prob of the model; null: the preset's (or the overrides')

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.from_checkpoint:
            raise ValueError("from_checkpoint: the demo pretrains its own model; fine-tune a folder with "
                             "`interbert finetune retrieval model.from_checkpoint=DIR`")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), not {self.dropout!r}")
        named = [name for name in DROPOUTS if name in self.overrides]
        if self.dropout is not None and named:
            raise ValueError(f"dropout sets every dropout of the model: leave it null to set "
                             f"overrides.{named[0]} alone")

    def recipe_model(self) -> dict[str, Any]:
        """The recipes' ``model`` section: these settings with the dropout written into the overrides."""
        dropouts = {name: self.dropout for name in DROPOUTS} if self.dropout is not None else {}
        return {"preset": self.preset, "from_bert": self.from_bert, "bert_lr_factor": self.bert_lr_factor,
                "overrides": {**self.overrides, **dropouts}}


@dataclass
class BenchmarkSettings:
    lang: str = choice("en", LANGUAGES)
    pretrain_images: int = 4000
    finetune_images: int = 300
    test_images: int = 80
    feature_dim: int = 2048
    max_tokens: int = 32  # every stage's padding
    max_regions: int = 24
    # issue 28's knobs of `data synth` (how much overlapping proposals leak, how many train images have a twin)
    proposals_per_object: list[int] = field(default_factory=lambda: list(PROPOSALS_PER_OBJECT))  # [MIN, MAX]
    group_iou: float = MIN_GROUP_IOU
    feature_noise: float = FEATURE_NOISE
    twin_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("pretrain_images", "finetune_images", "test_images", "feature_dim", "max_tokens", "max_regions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, not {getattr(self, name)!r}")
        if len(self.proposals_per_object) != 2:
            raise ValueError(f"proposals_per_object must be [MIN, MAX], not {self.proposals_per_object!r}")
        knobs = DetectorKnobs(tuple(self.proposals_per_object), self.group_iou, self.feature_noise)
        try:
            knobs.validate()
        except ValueError as error:  # it names `data synth`'s flag (--group-iou ...): name the key instead
            flag, _, rest = str(error).partition(" ")
            raise ValueError(f"{flag.removeprefix('--').replace('-', '_')} {rest}") from None
        if not (math.isfinite(self.twin_share) and 0.0 <= self.twin_share <= 1.0):
            raise ValueError(f"twin_share must be a share of the pretraining images in [0, 1], not {self.twin_share!r}")
        # the global region + every proposal: prepare_regions keeps the first max_regions - 1, so a smaller
        # padding would drop the last objects' proposals of the busiest scenes, unsaid
        regions = max_proposals(knobs=knobs) + 1
        if self.max_regions < regions:
            raise ValueError(f"max_regions {self.max_regions} would drop proposals: with proposals_per_object "
                             f"{self.proposals_per_object} a scene has up to {regions} regions (the global one "
                             f"included); set data.max_regions={regions}")


@dataclass
class PretrainStage:
    data: PretrainDataSettings = section(PretrainDataSettings)
    train: TrainConfig = section(TrainConfig)


@dataclass
class FinetuneStage:
    data: RetrievalDataSettings = section(RetrievalDataSettings)
    train: TrainConfig = section(TrainConfig)


@dataclass
class EvaluateStage:
    split: str | None = "test"
    pair_batch_size: int = 512


@dataclass
class VcrStage:
    enabled: bool = False
    max_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 5e-4


@dataclass
class DemoSettings:
    seed: int = 0
    model: DemoModelSettings = section(DemoModelSettings)
    data: BenchmarkSettings = section(BenchmarkSettings)
    pretrain: PretrainStage = section(PretrainStage)
    finetune: FinetuneStage = section(FinetuneStage)
    evaluate: EvaluateStage = section(EvaluateStage)
    vcr: VcrStage = section(VcrStage)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return typed_config.to_dict(self)


STAGE_KINDS = {"data": BenchmarkSettings, "pretrain": PretrainStage, "finetune": FinetuneStage,
               "evaluate": EvaluateStage, "vcr": VcrStage}  # a file each in configs/demo/, beside demo.yaml


# what the demo sets in each recipe's sections itself (the benchmark's files and padding, the run's folders,
# the seed, the pretrained tokenizer): a stage file or override that sets one would be silently replaced
SET_BY_THE_DEMO = {
    "pretrain": {"data": ("captions", "features", "max_tokens", "max_regions"), "train": ("output_dir", "seed")},
    "finetune": {"data": ("captions", "features", "max_tokens", "max_regions", "tokenizer"),
                 "train": ("output_dir", "seed")},
}
WHERE_FROM = {"captions": "the benchmark, data.yaml", "features": "the benchmark, data.yaml",
              "max_tokens": "data.max_tokens", "max_regions": "data.max_regions", "tokenizer": "the pretrained model's",
              "output_dir": "a folder of interbert demo --out", "seed": "the demo's seed"}


# ---- reading ----------------------------------------------------------------------------------------
def config_file(name: str) -> Path:
    """A shipped file of ``configs/demo/`` (package data, as the recipes' configs)."""
    return Path(str(resources.files("interbert") / "configs" / "demo" / f"{name}.yaml"))


def _refuse_set_by_the_demo(raw: Mapping[str, Any], source: str) -> None:
    for stage, sections in SET_BY_THE_DEMO.items():
        for name, keys in sections.items():
            given = raw.get(stage)
            given = given.get(name) if isinstance(given, Mapping) else None
            given = given if isinstance(given, Mapping) else {}  # not a mapping: the schema refuses it, by name
            for key in keys:
                if key in given:
                    raise ConfigError(f"{source}: {stage}.{name}.{key} is set by the demo ({WHERE_FROM[key]}); "
                                      "leave it out")


def load_demo(overrides: Iterable[str] = ()) -> DemoSettings:
    """The shipped demo settings (``configs/demo/``) with dotted ``key=value`` overrides applied in order."""
    path, raw = read_config(config_file("demo"))
    files = {stage: config_file(stage) for stage in STAGE_KINDS}
    for stage, stage_file in files.items():
        raw[stage] = read_config(stage_file)[1]
    source = f"interbert demo ({path.parent})"
    for text in overrides:
        typed_config.override(raw, text, DemoSettings, source)
    _refuse_set_by_the_demo(raw, source)
    typed = {stage: typed_config.from_dict(kind, raw.pop(stage), stage, str(files[stage]))
             for stage, kind in STAGE_KINDS.items()}
    return typed_config.from_dict(DemoSettings, {**raw, **typed}, source=str(path))


def overridable(demo: DemoSettings) -> dict[str, Any]:
    """The settings as a dict without the keys the demo sets in the stages itself (``SET_BY_THE_DEMO``):
    what ``key=value`` may change."""
    values = demo.to_dict()
    for stage, sections in SET_BY_THE_DEMO.items():
        for name, keys in sections.items():
            for key in keys:
                del values[stage][name][key]
    return values


def same_config(recorded: Mapping[str, Any] | None, planned: DemoSettings) -> bool:
    """Whether a finished run's recorded settings (``DemoSettings.to_dict()``) are ``planned``. The record is
    read through today's schema, so a setting added since counts as its default (new settings default to
    what ran before them); a record the schema refuses (a setting since removed), or none, is not the same."""
    if recorded is None:
        return False
    try:
        return typed_config.from_dict(DemoSettings, recorded, source="recorded run").to_dict() == planned.to_dict()
    except ConfigError:
        return False


# ---- the command line -------------------------------------------------------------------------------
# `interbert demo --quick`: every stage for a few steps on a few images (numbers meaningless)
QUICK = ("data.pretrain_images=60", "data.finetune_images=20", "data.test_images=10", "data.feature_dim=64",
         "pretrain.data.vocab_size=120", "pretrain.train.max_steps=6", "pretrain.train.batch_size=8",
         "finetune.train.max_steps=4", "finetune.train.batch_size=4", "vcr.max_steps=3", "vcr.batch_size=2")


def flag_overrides(*, quick: bool = False, lang: str | None = None, seed: int | None = None, vcr: bool = False,
                   preset: str | None = None, from_bert: str | None = None, layers: Iterable[int] | None = None) -> list[str]:
    """``interbert demo``'s flags as the overrides they stand for (``--quick`` first: the flags win); a flag
    not given leaves the shipped value."""
    out = list(QUICK if quick else ())
    if seed is not None:
        out.append(f"seed={seed}")
    if lang is not None:
        out.append(f"data.lang={lang}")
    if lang == "zh":  # Chinese: character tokens, masked as whole jieba words
        out.append("pretrain.data.word_segmenter=jieba")
    if vcr:
        out.append("vcr.enabled=true")
    if preset:
        out.append(f"model.preset={preset}")
    if from_bert:
        out.append(f"model.from_bert={json.dumps(str(from_bert))}")  # quoted: a path is a string, whatever it holds
    if layers:
        single, text, image = layers
        out += [f"model.overrides.num_single_stream_layers={single}", f"model.overrides.num_text_stream_layers={text}",
                f"model.overrides.num_image_stream_layers={image}"]
    return out


# ---- each recipe's settings -------------------------------------------------------------------------
def benchmark_files(manifest: Mapping[str, Any], data_dir: Path) -> dict[str, str]:
    """The generated benchmark's caption file and feature store (its manifest's ``files``, under ``data_dir``)."""
    return {"captions": str(data_dir / manifest["files"]["captions"]),
            "features": str(data_dir / manifest["files"]["regions"])}


def _stage_sections(demo: DemoSettings, stage: PretrainStage | FinetuneStage, files: Mapping[str, str],
                    output_dir: Path, device: str | None) -> dict[str, Any]:
    """A training stage's ``data`` and ``train`` with what the demo sets in them."""
    padding = {"max_tokens": demo.data.max_tokens, "max_regions": demo.data.max_regions}
    on = {"device": device} if device else {}
    return {"data": {**typed_config.to_dict(stage.data), **files, **padding},
            "train": {**typed_config.to_dict(stage.train), "output_dir": str(output_dir), "seed": demo.seed, **on}}


def pretrain_settings(demo: DemoSettings, out: Path, files: Mapping[str, str], device: str | None = None) -> PretrainSettings:
    """The ``pretrain`` recipe's settings for the demo's pretraining, writing to ``out/pretrain``.
    ``device``: where to train (None: the recipe's default, auto)."""
    sections = _stage_sections(demo, demo.pretrain, files, out / "pretrain", device)
    return PretrainSettings.coerce({"model": demo.model.recipe_model(), **sections}, "interbert demo: pretraining")


def finetune_settings(demo: DemoSettings, output_dir: Path, files: Mapping[str, str], tokenizer: str,
                      checkpoint: str | None, device: str | None = None) -> RetrievalSettings:
    """The ``finetune retrieval`` recipe's settings: from ``checkpoint`` (its weights say it all), or without
    one from the demo's model (the text path BERT's where the settings say); ``tokenizer``: a model folder."""
    model = {**demo.model.recipe_model(), "from_checkpoint": checkpoint, **({"from_bert": None} if checkpoint else {})}
    sections = _stage_sections(demo, demo.finetune, files, output_dir, device)
    sections["data"]["tokenizer"] = tokenizer
    return RetrievalSettings.coerce({"model": model, **sections}, "interbert demo: fine-tuning")


def evaluate_arguments(demo: DemoSettings) -> dict[str, Any]:
    """``evaluate_retrieval``'s settings for every evaluation of the demo (the caller adds the model's own)."""
    return {"split": demo.evaluate.split, "max_tokens": demo.data.max_tokens, "max_regions": demo.data.max_regions,
            "pair_batch_size": demo.evaluate.pair_batch_size}


def generate_arguments(demo: DemoSettings) -> dict[str, Any]:
    """``interbert.synthetic.generate``'s settings for the demo's benchmark (a memory-mapped store: ~7x
    faster batches than TSV)."""
    data = demo.data
    knobs = {name: getattr(data, name) for name, default in KNOB_DEFAULTS.items() if getattr(data, name) != default}
    return {"images": data.pretrain_images + data.finetune_images + data.test_images, "lang": data.lang,
            "seed": demo.seed, "feature_dim": data.feature_dim, "fmt": "store",
            "val_images": data.finetune_images, "test_images": data.test_images, **knobs}


# `data synth`'s defaults of issue 28's knobs: generate_arguments names a knob only where it differs, so the
# demo's default benchmark is generated by the very call it was before the knobs
KNOB_DEFAULTS = {"proposals_per_object": list(PROPOSALS_PER_OBJECT), "group_iou": MIN_GROUP_IOU,
                 "feature_noise": FEATURE_NOISE, "twin_share": 0.0}


# results.json's ``plan``: the settings under the flat names the demo's results were recorded with before it
# had configs (an output field, read by the table and by whoever reads those results)
PLAN_NAMES = {
    "lang": "data.lang", "seed": "seed", "pretrain_images": "data.pretrain_images",
    "finetune_images": "data.finetune_images", "test_images": "data.test_images", "feature_dim": "data.feature_dim",
    "max_tokens": "data.max_tokens", "max_regions": "data.max_regions", "vocab_size": "pretrain.data.vocab_size",
    "pretrain_steps": "pretrain.train.max_steps", "pretrain_batch": "pretrain.train.batch_size",
    "pretrain_lr": "pretrain.train.learning_rate", "finetune_steps": "finetune.train.max_steps",
    "finetune_batch": "finetune.train.batch_size", "finetune_lr": "finetune.train.learning_rate",
    "warmup_ratio": "pretrain.train.warmup_ratio", "negatives": "pretrain.data.negatives", "msm": "pretrain.data.msm",
    "mrm": "pretrain.data.mrm", "hard_ratio": "pretrain.data.hard_ratio", "hard_ratio_start": "pretrain.data.hard_ratio_start",
    "task_sampling": "pretrain.data.task_sampling", "preset": "model.preset", "dropout": "model.dropout",
    "from_bert": "model.from_bert", "tokenizer": "pretrain.data.tokenizer", "vcr": "vcr.enabled",
    "vcr_steps": "vcr.max_steps", "vcr_batch": "vcr.batch_size", "vcr_lr": "vcr.learning_rate", "notes": "notes",
}
PLAN_MODEL_FIELDS = ("embedding_size", "itc_loss_weight", "itm_inputs", "msm_pairs")  # InterBertConfig fields


def plan_view(demo: DemoSettings) -> dict[str, Any]:
    """The settings as the flat ``plan`` of results.json (``PLAN_NAMES``, the model's fields as resolved)."""
    values = demo.to_dict()
    plan = {name: functools.reduce(lambda node, part: node[part], key.split("."), values) for name, key in PLAN_NAMES.items()}
    overrides, base = demo.model.overrides, preset(demo.model.preset)
    plan.update({name: overrides.get(name, getattr(base, name)) for name in PLAN_MODEL_FIELDS})
    depths = [overrides.get(f"num_{stream}_stream_layers") for stream in ("single", "text", "image")]
    plan["layers"] = depths if all(depth is not None for depth in depths) else None
    return plan
