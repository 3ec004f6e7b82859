"""What the recipes share: reading a model folder, building the tokenizer and the data, saving results.

A recipe is a thin script: settings (:mod:`interbert.recipes.settings`: YAML + ``key=value`` overrides,
typed) -> these builders -> the one
training loop (:mod:`interbert.train`) or the evaluation functions -> files in ``train.output_dir``.
The builders take the values they use, not a recipe's settings: a recipe's ``run`` reads its settings and
passes them on, so what each step depends on shows in its signature and this module knows no recipe's
schema (only :func:`require_settings` reads settings, by dotted key, to refuse a run missing one).

Under torchrun every rank runs the recipe. :func:`start_run` joins the process group first, so that
what all ranks must share is made once, on rank 0 (:func:`interbert.train.main_process_first`: a
trained vocabulary, the TF-IDF cache), and only rank 0 writes the results.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from interbert.config import InterBertConfig, preset
from interbert.data import model_inputs
from interbert.data.captions import Caption, blank_captions, blank_captions_message, read_captions
from interbert.data.check import verify_images
from interbert.data.features import FeatureStore, open_features
from interbert.data.sources import Source
from interbert.data.tokenize import (
    load_tokenizer,
    save_wordpiece,
    tokenizer_from_vocab,
    train_wordpiece,
    vocab_text,
    wordpiece_vocabulary,
)
from interbert.errors import UsageError
from interbert.model_card import write_model_card
from interbert.modeling import InterBertPreTrainedModel
from interbert.processing import save_processor
from interbert.train import (
    FINAL_WEIGHTS_NAME,
    Trainer,
    TrainConfig,
    init_distributed,
    main_process_first,
    seed_everything,
)
from interbert.utils import load_config
from interbert.utils.config_files import MANDATORY, ConfigError, mandatory_keys
from interbert.utils.device import resolve_device
from interbert.utils.files import remove_leftover_temporaries, replace_folder

logger = logging.getLogger(__name__)

MODEL_DIR = "model"  # under output_dir: the trained model as save_pretrained + its tokenizer


def load_recipe_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A recipe's YAML with its ``key=value`` overrides, untyped: ``train.*`` may set every
    :class:`TrainConfig` field, any other key must be in the file. The recipes' ``run`` takes it (coercing
    it through their schema); ``Settings.load`` (:mod:`interbert.recipes.settings`) accepts every setting."""
    return load_config(path, overrides, optional_keys={"train": TrainConfig.field_names()})


def setting(cfg: Any, key: str) -> Any:
    """The value of a dotted ``key`` (``data.captions``) of typed settings or a mapping, None when it or
    a section above it is absent."""
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else getattr(node, part, None)
    return node


def require_settings(cfg: Any, required: Mapping[str, str], source: str = "config") -> None:
    """Refuse a run whose required settings are null or absent, naming every one and how to pass it.

    ``required`` maps dotted keys to what their value is (``{"data.captions": "FILE"}``); without this a
    missing path surfaced as ``TypeError: expected str ... not NoneType`` from deep inside a reader."""
    required = {**required, **{key: "VALUE" for key in mandatory_keys(cfg)}}  # ??? in the file: no default
    missing = [key for key in required if setting(cfg, key) in (None, "", MANDATORY)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        how = " ".join(f"{key}={required[key]}" for key in missing)
        raise ConfigError(f"{source}: {' and '.join(missing)} {verb} required (pass {how})")


def model_folder(path: str | Path, key: str, source: str = "config") -> Path:
    """A model folder named by a setting; checked here because ``from_pretrained`` would otherwise take
    a missing folder for a Hub model id and fail with a message that names neither the setting nor the path."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{source}: {key}={path} is not a model folder (no config.json); give the `model` "
                          "folder a recipe wrote")
    return path


def captions_of_split(path: str | Path, split: str | None, max_images: int | None = None) -> list[Caption]:
    """The captions of one split (all of them when ``split`` is None), optionally the first N images."""
    captions = read_captions(path)
    blank = blank_captions(captions)
    if blank:  # kept, each would pair its image with an empty text: skipped, never silently
        logger.warning("skipping %s", blank_captions_message(path, blank))
        captions = [c for c in captions if c.text.strip()]
    if split is not None:
        splits = sorted({str(c.split) for c in captions})
        captions = [c for c in captions if c.split == split]
        if not captions:
            raise UsageError(f"{path}: no captions in split {split!r}; the file's splits: {', '.join(splits)} "
                             "(choose one, or null / 'all' for every caption)")
    if max_images is not None:
        keep = set(list(dict.fromkeys(c.image_id for c in captions))[:max_images])
        captions = [c for c in captions if c.image_id in keep]
    return captions


def training_data(sources: Sequence[Source], split: str | None, max_images: int | None = None,
                  ) -> tuple[list[Caption], FeatureStore]:
    """The captions of ``split`` and the features of their images, from the one unnamed source
    (``data.captions`` + ``data.features``) or from every source of ``data.sources`` (ids namespaced by
    source name, the first ``max_images`` images of each; the mixing rule: :mod:`interbert.data.sources`).
    ``sources``: :func:`~interbert.data.sources.sources_from_config` of the run's ``data`` section."""
    from interbert.data.sources import SourceStore, namespaced

    if sources[0].name is None:  # the single-path form: ids as the files spell them
        return captions_of_split(sources[0].captions, split, max_images), feature_store(sources[0].features)
    captions = [c for s in sources for c in namespaced(captions_of_split(s.captions, split, max_images), s.name)]
    return captions, SourceStore({s.name: feature_store(s.features) for s in sources})


def tokenizer_for(texts: Sequence[str], output_dir: Path, vocab_size: int, *, load_from: str | None = None,
                  lowercase: bool = True, resume: bool = False):
    """The tokenizer a run uses: the one in ``load_from`` (a vocab.txt or a model folder: ``data.tokenizer``,
    else the folder the text path starts from), or a ``vocab_size`` WordPiece vocabulary trained on the
    training ``texts`` into ``output_dir/tokenizer`` (saved with the model; a resumed run reuses it)."""
    if load_from:
        return load_tokenizer(load_from)
    return train_run_wordpiece(list(texts), output_dir / "tokenizer", vocab_size=vocab_size, lowercase=lowercase,
                               resume=resume)


def train_run_wordpiece(texts: list[str], folder: Path, vocab_size: int, lowercase: bool = True,
                        resume: bool = False):
    """A run's WordPiece vocabulary trained on ``texts`` into ``folder``. Training is reproducible
    (:func:`~interbert.data.tokenize.wordpiece_vocabulary`), but reading what was written is cheaper and
    keeps a run tied to its own vocabulary whatever the code version: under torchrun rank 0 trains it and
    the other ranks load it, and a resumed run (``resume``) loads the vocabulary its checkpoint was
    trained with.

    A folder that already holds a vocabulary belongs to an earlier run: it is reused when these texts train
    the same one, and otherwise replaced only when this run starts training (:func:`install_run_tokenizer`),
    so a run that fails before then leaves the earlier run resumable (its checkpoint's embeddings are sized
    to its vocabulary)."""
    # read on rank 0 only, before anything is written: every rank then takes the same branch
    existing = shared_from_main(lambda: _read_vocab(folder))
    if existing is not None and resume:
        logger.info("resuming: reusing the run's WordPiece vocabulary in %s", folder)
        return load_tokenizer(folder)
    if existing is None:
        with main_process_first() as main:
            if not main:
                return load_tokenizer(folder)
            logger.info("training a %d-token WordPiece vocabulary on %d texts", vocab_size, len(texts))
            return train_wordpiece(texts, folder, vocab_size=vocab_size, lowercase=lowercase, min_frequency=1)
    vocab = shared_from_main(lambda: wordpiece_vocabulary(texts, vocab_size, lowercase=lowercase, min_frequency=1))
    if vocab_text(vocab) == existing:
        logger.info("reusing the WordPiece vocabulary in %s (these texts train the same one)", folder)
        return load_tokenizer(folder)
    logger.info("%s holds an earlier run's %d-token vocabulary; this run's (%d tokens) replaces it when training "
                "starts", folder, existing.count("\n"), len(vocab))
    tokenizer = tokenizer_from_vocab(vocab, lowercase)
    setattr(tokenizer, _PENDING_VOCABULARY, (folder, vocab, lowercase))
    return tokenizer


_PENDING_VOCABULARY = "_interbert_pending_vocabulary"  # (folder, vocab, lowercase): not yet written


def _read_vocab(folder: Path) -> str | None:
    vocab_file = folder / "vocab.txt"
    return vocab_file.read_text(encoding="utf-8") if vocab_file.is_file() else None


def shared_from_main(compute: Any) -> Any:
    """``compute()`` run on rank 0 and sent to every rank (one process: just run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    holder = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def install_run_tokenizer(tokenizer, is_main: bool = True) -> None:
    """Write a vocabulary :func:`train_run_wordpiece` kept back (it replaces an earlier run's), now that the run
    is about to train; the folder is swapped whole (:func:`~interbert.utils.files.replace_folder`). Nothing to
    do for any other tokenizer."""
    pending = getattr(tokenizer, _PENDING_VOCABULARY, None)
    if pending is None:
        return
    delattr(tokenizer, _PENDING_VOCABULARY)
    folder, vocab, lowercase = pending
    if is_main:
        replace_folder(folder, lambda tmp: save_wordpiece(vocab, tmp, lowercase))
        logger.info("wrote this run's %d-token WordPiece vocabulary to %s", len(vocab), folder)


def build_config(preset_name: str, overrides: Mapping[str, Any], **fields: Any) -> InterBertConfig:
    """The preset ``preset_name`` (``model.preset``) with ``overrides`` (``model.overrides``) and the recipe's
    ``fields`` (sizes from the data), which win."""
    return preset(preset_name, **{**overrides, **fields})


# InterBertConfig fields that fix the weights' shapes or what they mean: a checkpoint keeps its own values.
ARCHITECTURE_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "num_single_stream_layers",
    "num_text_stream_layers", "num_image_stream_layers", "image_num_attention_heads", "image_intermediate_size",
    "region_feature_size", "num_region_classes", "pooled_size", "fusion", "hidden_act", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "embedding_size", "mrm_target", "pad_token_id", "initializer_range",
})


def checkpoint_updates(checkpoint: str | Path, overrides: Mapping[str, Any] | None, source: str = "config",
                       ) -> dict[str, Any]:
    """What ``overrides`` (``model.overrides``) change in the model folder ``checkpoint``
    (``model.from_checkpoint``): every field that does not fix the weights (dropouts, loss weights, the
    objectives' wiring, the ITC temperature ...). An architecture field the checkpoint has with another
    value cannot change: it is named in one warning line, not dropped silently."""
    overrides = dict(overrides or {})
    if not overrides:
        return {}
    saved = InterBertConfig.from_pretrained(checkpoint)
    kept = {k: (v, getattr(saved, k)) for k, v in overrides.items() if k in ARCHITECTURE_FIELDS and getattr(saved, k) != v}
    if kept:
        logger.warning("%s: model.from_checkpoint=%s keeps its own %s (model.overrides ask for %s): a checkpoint's "
                       "sizes are its weights'", source, checkpoint,
                       ", ".join(f"{k}={have!r}" for k, (_, have) in kept.items()),
                       ", ".join(f"{k}={want!r}" for k, (want, _) in kept.items()))
    return {k: v for k, v in overrides.items() if k not in ARCHITECTURE_FIELDS}


def mrm_target_of(store: FeatureStore) -> str:
    """What masked region modeling can predict on this store: the detector's class distributions when
    it has them (the paper), else the region features."""
    return "classes" if store[store.ids()[0]].class_probs is not None else "features"


def new_model(model_class: type[InterBertPreTrainedModel], tokenizer, store: FeatureStore, *, preset_name: str,
              overrides: Mapping[str, Any], from_bert: str | None = None, **fields: Any):
    """A model sized to the data: region features, detector classes and the MRM target from the store; the
    text path from ``from_bert`` (``model.from_bert``: BERT's width and vocabulary) or, from scratch, the
    preset ``preset_name`` with ``overrides`` and the tokenizer's vocabulary. ``fields``: further
    InterBertConfig fields the recipe sets."""
    from interbert.convert import from_bert as from_bert_folder

    fields.update(region_feature_size=store.feature_dim, mrm_target=mrm_target_of(store))
    first = store[store.ids()[0]]
    if first.class_probs is not None:
        fields["num_region_classes"] = int(first.class_probs.shape[1])
    if from_bert:
        return from_bert_folder(from_bert, preset_name, model_class, **{**overrides, **fields})
    return model_class(build_config(preset_name, overrides, vocab_size=len(tokenizer), **fields))


def check_region_feature_size(model: InterBertPreTrainedModel, store: FeatureStore, source: str = "config",
                              what: str = "model.from_checkpoint") -> None:
    """A model built for other features would fail at its first forward with a bare shape error
    (``mat1 and mat2 shapes cannot be multiplied``); ``what`` names the model in the message."""
    if model.config.region_feature_size != store.feature_dim:
        raise ConfigError(f"{source}: {what} expects {model.config.region_feature_size}-d region features, "
                          f"but {store.path} holds {store.feature_dim}-d ones")


def bert_lr_multiplier(factor: float | None, from_bert: str | None):
    """``factor`` (``model.bert_lr_factor``) for the BERT-initialised weights (embeddings, single and text
    streams), when the text path comes from BERT (``from_bert``: ``model.from_bert``); None otherwise."""
    if not (factor and from_bert):
        return None
    prefixes = ("interbert.embeddings.", "interbert.single_stream.", "interbert.text_stream.")
    return lambda name: factor if name.startswith(prefixes) else 1.0


def feature_store(path: str | Path) -> FeatureStore:
    return open_features(path)


def verify_features(examples: Sequence[Any], store: FeatureStore, progress: bool = False) -> None:
    """Before training: read every image the ``examples`` use (captions, VCR items: anything with an
    ``image_id``) once and refuse the run, naming the image, when one cannot train (undecodable, NaN, wrong
    size, no regions). Found later, such an image stops a run hours in, or NaN poisons the weights
    silently. A recipe skips the pass (one read of the images) on ``data.verify_features: false``, for a
    store ``interbert data check`` has passed."""
    verify_images(store, sorted({e.image_id for e in examples if e.image_id in store}), progress=progress)


def save_trained(trainer: Trainer, tokenizer, output_dir: Path, extra: dict | None = None) -> Path:
    """The trained model (EMA weights when EMA is on) as a ``save_pretrained`` folder with its tokenizer
    and model card (README.md; ``extra["metrics"]``: final results for it), written by the main process
    (the ranks of a distributed run hold the same weights)."""
    target = output_dir / MODEL_DIR
    if not trainer.dist.is_main:
        return target
    with trainer.averaged_weights() as model:
        model.save_pretrained(target)
        # the validation metrics on the card are those of these weights: an evaluation at the last update
        evaluated = trainer.eval_history[-1] if trainer.eval_history and trainer.eval_history[-1]["step"] == trainer.step else None
        write_model_card(target, model, recipe=extra, steps=trainer.step, history=trainer.history,
                         metrics=(extra or {}).get("metrics"), validation=evaluated, test=(extra or {}).get("test"))
        # the tokenizer as AutoProcessor loads it, truncating at the model's positions
        save_processor(target, tokenizer, model.config, extra)
    if extra:
        (target / "recipe.json").write_text(json.dumps(extra, indent=2, default=str))
    final = output_dir / FINAL_WEIGHTS_NAME
    if final.exists():  # the loop's plain state dict duplicates what save_pretrained just wrote
        final.unlink()
    return target


def training_summary(result, model_dir: Path, seconds: float, dataset) -> dict:
    """What a caption recipe's ``run`` returns: the loop's ``result`` (:meth:`Trainer.fit`), where the model
    was saved, the wall time and the size of the training ``dataset``."""
    return {"model_dir": str(model_dir), "steps": result.step, "seconds": seconds,
            "history": result.history, "examples": len(dataset), "images": len(dataset.image_ids),
            "validation": result.eval_history, "best": result.best, "stopped_early": result.stopped_early,
            "compile_seconds": result.compile_seconds}


def set_threads(n: int | None, key: str = "threads") -> None:
    """Torch's intra-op threads (None: torch's default). A value that is not a whole number >= 1 is a
    usage error naming ``key``, not a ValueError from torch."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"{key} must be a whole number >= 1 (or null for torch's default), not {n!r}")
    torch.set_num_threads(n)


def start_run(output_dir: str | Path, *, device: str, seed: int, threads: int | None = None,
              source: str = "config") -> Path:
    """What every training recipe does first (after reading its settings): ``threads`` (the ``threads``
    setting), joining the process group on ``device`` (``train.device``), the output folder ``output_dir``
    (``train.output_dir``, returned as a Path) and seeding with ``seed`` (``train.seed``)."""
    set_threads(threads, f"{source}: threads")
    init_distributed(resolve_device(device, int(os.environ.get("LOCAL_RANK", "0"))))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:  # one rank cleans; the others' writes have not started
        remove_leftover_temporaries(out)  # .checkpoint.pt.tmp-* of a killed run: up to tens of MB each
    # A new model's initial weights (and anything else drawn before the loop seeds itself) follow the
    # seed: torch seeds its default generator from the OS in every process, so without this two runs
    # with the same seed start from different weights.
    seed_everything(seed)
    return out


@torch.no_grad()
def argmax_predictions(model: torch.nn.Module, dataset, collate_fn, batch_size: int) -> list[int]:
    """Arg-max of the model's ``logits`` for every example of ``dataset``, in order, batched through
    ``collate_fn`` (labels and the batch's bookkeeping are not passed on; eval mode, the model's mode restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions: list[int] = []
    for start in range(0, len(dataset), batch_size):
        batch = collate_fn([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if k != "labels"}
        predictions.extend(model(**inputs).logits.argmax(-1).tolist())
    model.train(was_training)
    return predictions



def weighted_sources(dataset, sources: Sequence[Source], seed: int):
    """``dataset`` drawn by the weights of its ``sources`` (``data.sources``;
    :class:`~interbert.data.sources.WeightedSources`), or ``dataset`` itself when no source sets a weight
    other than 1 (plain concatenation)."""
    from interbert.data.sources import WeightedSources

    weights = {s.name: s.weight for s in sources}
    if all(weight == 1.0 for weight in weights.values()):
        return dataset
    return WeightedSources(dataset, weights, seed)


def bucketed_collate(dataset, length_buckets, region_buckets, pad_token_id: int, msm_budget: str = "none",
                     batch_size: int | None = None):
    """The caption datasets' collate with the ``data.length_buckets`` / ``data.region_buckets`` settings resolved
    to edges (``auto``: from ``dataset``'s length histogram, :func:`~interbert.data.batches.bucket_edges`;
    ``none``: each batch padded to its own longest, as before). The edges are logged: they are the shapes a
    compiled step sees. ``msm_budget="auto"`` with text buckets (``data.msm_budget``, pretraining): batches of
    ``batch_size`` also carry ``msm_positions``, budgets per text bucket from ``dataset``'s masked-count
    histogram (:func:`~interbert.data.batches.masked_count_budgets`), logged too."""
    import functools

    from interbert.data.batches import bucket_edges, collate, masked_count_budgets

    def edges(setting, lengths):
        if setting == "none":
            return None
        return bucket_edges(lengths()) if setting == "auto" else list(setting)

    text = edges(length_buckets, dataset.text_lengths)
    regions = edges(region_buckets, dataset.region_counts)
    if text or regions:
        logger.info("length buckets: text %s, regions %s", text or "none", regions or "none")
    budgets = None
    if msm_budget == "auto" and text and batch_size:
        budgets = masked_count_budgets(*dataset.masked_token_counts(), batch_size, text)
        logger.info("masked-token budgets per text bucket (batch %d): %s", batch_size, budgets)
    return functools.partial(collate, pad_token_id=pad_token_id, length_buckets=text, region_buckets=regions,
                             msm_budgets=budgets)
