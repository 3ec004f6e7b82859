"""The settings of each recipe: one typed schema per recipe, the one place their defaults live.

Each recipe's config is ``model`` + ``data`` + ``train`` (:class:`~interbert.train.TrainConfig`) +
``threads``. The shipped ``configs/*_tiny.yaml`` state only the tiny-size choices; every other setting
takes the default written here. Every field can be overridden on the command line (``data.num_hard=20``,
``train.bf16=false``, ``model.overrides.hidden_dropout_prob=0.2``), and ``interbert <recipe>
--print-config`` prints them all, resolved. ``model.overrides`` and ``model.config_updates`` are
:class:`~interbert.config.InterBertConfig` fields, checked by that class. The recipes' ``run`` takes
these settings or a plain dict (coerced through the schema, so a dict gets the same defaults and checks).

Adding a setting is one line in its section here (with its default); the recipe then reads it as an attribute.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interbert.config import PRESETS, InterBertConfig, preset
from interbert.data.batches import TASK_SAMPLING
from interbert.data.masking import TEXT_MASKERS
from interbert.data.vcr import TASKS as VCR_TASKS
from interbert.errors import shown
from interbert.train import TrainConfig
from interbert.utils import typed_config
from interbert.utils.config_files import ConfigError
from interbert.utils.typed_config import checked, choice, section, setting

# tfidf: the paper's ITM-hn (TF-IDF-similar captions of other images); random: other images' captions;
# in_batch: matched pairs only, re-paired in the model with batch images drawn by embedding similarity
NEGATIVES = ("tfidf", "random", "in_batch")
REGION_CACHE = (True, False, "auto")


def _buckets(value: str | list[int], key: str, source: str = "config") -> str | list[int]:
    """``none`` (pad each batch to its own longest), ``auto`` (edges from the data's length histogram) or
    ascending whole-number edges >= 1, e.g. [16, 24, 32]."""
    if isinstance(value, str):
        if value not in ("none", "auto"):
            raise ConfigError(f"{source}: {key} must be none, auto or a list of ascending lengths, not {shown(value)}")
        return value
    if not value or any(edge < 1 for edge in value) or list(value) != sorted(set(value)):
        raise ConfigError(f"{source}: {key} must be none, auto or a list of ascending lengths >= 1, not {shown(value)}")
    return value


def buckets_setting() -> Any:
    return setting("none", check=_buckets, expect="none, auto or a list of ascending lengths")


@functools.cache
def _config_fields() -> dict[str, Any]:
    """InterBertConfig's own fields (its ``__init__`` parameters) and their types."""
    hints = typing.get_type_hints(InterBertConfig.__init__)
    parameters = inspect.signature(InterBertConfig.__init__).parameters.values()
    return {p.name: hints.get(p.name, Any) for p in parameters
            if p.name != "self" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def config_fields(values: dict[str, Any], key: str, source: str = "config") -> dict[str, Any]:
    """``values`` as InterBertConfig fields: each key one of its fields, each value of that field's type."""
    fields = _config_fields()
    for name in values:
        if name not in fields:
            raise ConfigError(f"{source}: {key}.{name} is not an InterBertConfig field; its fields: {', '.join(fields)}")
    return {name: typed_config.coerce(value, fields[name], f"{key}.{name}", source) for name, value in values.items()}


def _same_file(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _other_file(settings: Any, name: str) -> None:
    """A held-out captions file (``val_captions``, ``test_captions``) must not be the training file."""
    path = getattr(settings, name)
    if path is not None and settings.captions is not None and _same_file(path, settings.captions):
        hint = "; for a split inside data.captions use data.val_split" if name == "val_captions" else ""
        raise ValueError(f"{name} is data.captions ({path}): held-out captions must be a file the run does not "
                         f"train on{hint}")


def _positive(settings: Any, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")


# ---- model ------------------------------------------------------------------------------------------
@dataclass
class ModelSettings:
    preset: str = choice("tiny", PRESETS)  # tiny | small (MiniLM-sized, 384 wide, 3+3+3) | base (the paper)
    # InterBertConfig fields. With from_checkpoint, those that do not fix the weights (dropouts, loss weights,
    # the objectives' wiring) change the loaded model; it keeps its own sizes (a different one is logged)
    overrides: dict[str, Any] = checked(config_fields, dict)
    from_bert: str | None = None  # a BERT folder (or a name in the local Hugging Face cache): the text path
    from_checkpoint: str | None = None  # an InterBERT model folder to continue from

    def __post_init__(self) -> None:
        if not self.from_bert:  # with BERT the text sizes come from it: its config checks the result
            try:
                preset(self.preset, **self.overrides)  # InterBertConfig.validate: e.g. heads that divide hidden_size
            except ValueError as e:
                raise ValueError(f"overrides: {e}") from None


@dataclass
class BertModelSettings(ModelSettings):
    bert_lr_factor: float | None = None  # e.g. 0.1: the BERT-initialised weights train 10x slower


@dataclass
class RetrievalModelSettings(BertModelSettings):
    # InterBertConfig fields changed on a loaded checkpoint (e.g. {itc_loss_weight: 0.0}); the model is
    # loaded with the changed (validated) config
    config_updates: dict[str, Any] = checked(config_fields, dict)


# ---- data -------------------------------------------------------------------------------------------
@dataclass
class TokenizerSettings:
    tokenizer: str | None = None  # vocab.txt or a model folder; null: the model's, else one trained on the texts
    vocab_size: int = 30522  # size of that trained vocabulary (BERT-base's by default)


@dataclass
class CaptionDataSettings(TokenizerSettings):
    captions: str | None = None  # Karpathy JSON / COCO JSON / Flickr8k token file / LAVIS list / JSON lines
    features: str | None = None  # feature store, bottom-up TSV, npz folder, HDF5
    split: str | None = "train"  # null: every caption
    max_images: int | None = None  # the first N images of the split
    val_split: str | None = None  # validation captions for train.eval_every; null: the file's 'val' split
    val_images: int | None = None  # the first N validation images; null: all
    # A file of validation captions, all of them (train.eval_every): LAVIS ships its splits as separate files
    # (coco_karpathy_train.json, _val.json, _test.json); data.captions is then the training file. null:
    # validation is the data.val_split of data.captions (one file holding every split)
    val_captions: str | None = None
    lowercase: bool = True  # of the trained vocabulary
    max_tokens: int = 36
    max_regions: int = 36
    region_cache: bool | str = choice("auto", REGION_CACHE)  # keep every image's regions in memory
    verify_features: bool = True  # read every image once before training
    # Static shapes for train.compile: pad each batch's captions / region lists up to the smallest of a few
    # lengths instead of its own longest. none: off (each batch its own longest); auto: up to 4 edges from
    # the data's length histogram (interbert.data.batches.bucket_edges); or the edges, e.g. [16, 24, 32].
    # The masks keep the results those of the unpadded batch.
    length_buckets: str | list[int] = buckets_setting()
    region_buckets: str | list[int] = buckets_setting()

    def __post_init__(self) -> None:
        _positive(self, "max_images", "val_images", "vocab_size", "max_tokens", "max_regions")
        if self.val_captions is not None and self.val_split is not None:
            raise ValueError("val_captions (a file whose every caption is validation) and data.val_split (the split of "
                             "data.captions to validate on) are two ways to say one thing: set one of them")
        _other_file(self, "val_captions")


@dataclass
class PretrainDataSettings(CaptionDataSettings):
    # several corpora instead of captions + features: [{name, captions, features, weight?}]
    # (checked by interbert.data.sources)
    sources: list[dict[str, Any]] | None = None
    msm: str = choice("span", TEXT_MASKERS)
    mrm: str = choice("group", ("group", "region"))
    negatives: str = choice("tfidf", NEGATIVES)
    hard_ratio: float = 1.0  # share of negatives that are TF-IDF hard (the rest random)
    # a share: the hard share ramps linearly from it at step 0 to hard_ratio at the last step; null: fixed
    hard_ratio_start: float | None = None
    num_hard: int = 10
    word_segmenter: str | None = choice(None, ("jieba",))  # whole-word masking of Chinese captions
    # joint: every step takes every objective; alternate: UNITER-style, masked steps (MSM + MRM on a caption
    # with its own image) and matching steps (ITM + ITC on unmasked pairs) in turn, each one encoder pass
    task_sampling: str = choice("joint", TASK_SAMPLING)
    # With length_buckets on, batches carry msm_positions: the masked tokens' indices padded to a budget per
    # text bucket from the data's masked-count histogram (auto), so that the static-shape mode of
    # train.compile runs the MSM head on those only; none: the head runs on every position there.
    msm_budget: str = choice("auto", ("auto", "none"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sources and self.val_captions is not None:
            raise ValueError("val_captions goes with data.captions; with data.sources each source's file holds its "
                             "validation split (data.val_split)")
        for name in ("hard_ratio", "hard_ratio_start"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a share between 0 and 1, not {value!r}")


@dataclass
class RetrievalDataSettings(CaptionDataSettings):
    hard_negative: str = choice("image", ("image", "caption"))
    num_hard: int = 100
    # A file of test captions (LAVIS's coco_karpathy_test.json): after training, the saved weights are evaluated
    # on all of it (every caption against every image): `test` in the run's summary, recipe.json, the model card
    test_captions: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _other_file(self, "test_captions")
        if self.test_captions is not None and self.val_captions is not None and \
                _same_file(self.test_captions, self.val_captions):
            raise ValueError(f"test_captions is data.val_captions ({self.test_captions}): the test set must be one "
                             "the run did not choose its best model on")


@dataclass
class VcrDataSettings(TokenizerSettings):
    train: str | None = None  # VCR jsonl
    val: str | None = None  # VCR jsonl: evaluated after training and every train.eval_every updates
    images_root: str | None = None  # the folder metadata_fn is relative to
    features: str | None = None  # feature store keyed by the stem of img_fn; null: stand-in features
    feature_dim: int | None = None  # size of the stand-in features (only without a store)
    tasks: list[str] = field(default_factory=lambda: list(VCR_TASKS))
    max_items: int | None = None
    max_tokens: int = 64
    max_regions: int = 36
    verify_features: bool = True

    def __post_init__(self) -> None:
        _positive(self, "max_items", "vocab_size", "max_tokens", "max_regions")
        if not self.tasks or not set(self.tasks) <= set(VCR_TASKS):
            raise ValueError(f"tasks must be a list of {', '.join(VCR_TASKS)}, not {shown(self.tasks)}")
        if self.feature_dim is not None and self.feature_dim < 5:
            raise ValueError(f"feature_dim must be a whole number >= 5 (the stand-in features hold the box "
                             f"geometry in their first 5 values), not {self.feature_dim!r}")


@dataclass
class TextDataSettings(TokenizerSettings):
    task: str | None = None  # sst2 | mrpc | qqp | qnli | rte; null: recognised from the header
    train: str | None = None  # a GLUE TSV file
    dev: str | None = None  # null: hold out test_fraction of train, split by split_seed
    test_fraction: float = 0.3
    split_seed: int = 0
    max_train_examples: int | None = None
    max_tokens: int = 128

    def __post_init__(self) -> None:
        _positive(self, "max_train_examples", "vocab_size", "max_tokens")


# ---- recipes ----------------------------------------------------------------------------------------
THREADS = "a whole number >= 1 (or null for torch's default)"


@dataclass
class RecipeSettings:
    """What every recipe's settings hold and do; each recipe narrows ``model`` and ``data`` to its own sections."""

    model: ModelSettings = section(ModelSettings)
    data: TokenizerSettings = section(TokenizerSettings)
    train: TrainConfig = section(TrainConfig)
    threads: int | None = setting(None, expect=THREADS)  # torch's intra-op threads; null: torch's default

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be {THREADS}, not {self.threads!r}")

    @classmethod
    def coerce(cls, values: Any, source: str = "config"):
        """These settings from a dict (a config file's mapping, or a recipe's ``run({...})`` from Python)."""
        return typed_config.from_dict(cls, values, source=source)

    @classmethod
    def load(cls, path: str | Path, overrides: typing.Iterable[str] = ()):
        """A config file (a path or a shipped config's name) with ``key=value`` overrides."""
        return typed_config.load(cls, path, overrides)

    def to_dict(self) -> dict[str, Any]:
        return typed_config.to_dict(self)


@dataclass
class PretrainSettings(RecipeSettings):
    model: BertModelSettings = section(BertModelSettings)
    data: PretrainDataSettings = section(PretrainDataSettings)


@dataclass
class RetrievalSettings(RecipeSettings):
    model: RetrievalModelSettings = section(RetrievalModelSettings)
    data: RetrievalDataSettings = section(RetrievalDataSettings)


@dataclass
class VcrSettings(RecipeSettings):
    data: VcrDataSettings = section(VcrDataSettings)


@dataclass
class TextSettings(RecipeSettings):
    data: TextDataSettings = section(TextDataSettings)


# the command -> its schema (``interbert pretrain``, ``interbert finetune retrieval`` ...)
RECIPES: dict[str, type[RecipeSettings]] = {
    "pretrain": PretrainSettings, "finetune retrieval": RetrievalSettings,
    "finetune vcr": VcrSettings, "finetune text": TextSettings,
}
