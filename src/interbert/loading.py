"""One way to load a saved model folder for a task: every recipe, evaluator and the search service use it.

A folder says what it holds in ``config.json`` (``model_type`` and ``architectures``, as
``save_pretrained`` writes them). A task asks for one kind of model; the table :data:`TASKS` says which
saved architectures can serve it and how:

- ``saved``: loaded as it was saved;
- ``itm``: a pretraining folder becomes a pair scorer whose score starts as the ITM margin
  (:func:`interbert.convert.retrieval_from_pretraining`), so fine-tuning starts from the zero-shot ranking;
- ``text``: any InterBERT keeps its text path and gets a new pooler + classifier.

Anything else is refused with a :class:`~interbert.errors.UsageError` that names the folder and what it holds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from interbert.config import InterBertConfig
from interbert.convert import retrieval_from_pretraining
from interbert.errors import DataError, UsageError
from interbert.modeling import (
    InterBertForImageTextRetrieval,
    InterBertForMultipleChoice,
    InterBertForPreTraining,
    InterBertForSequenceClassification,
    InterBertModel,
    InterBertPreTrainedModel,
)
from interbert.utils.files import update_digest

CLASSES: dict[str, type[InterBertPreTrainedModel]] = {
    cls.__name__: cls
    for cls in (InterBertModel, InterBertForPreTraining, InterBertForImageTextRetrieval, InterBertForMultipleChoice,
                InterBertForSequenceClassification)
}

# task -> the class it loads (None: the saved one) and {saved architecture: how}
TASKS: dict[str, tuple[type[InterBertPreTrainedModel] | None, dict[str, str]]] = {
    "pretraining": (InterBertForPreTraining, {"InterBertForPreTraining": "saved"}),
    "retrieval": (InterBertForImageTextRetrieval, {"InterBertForImageTextRetrieval": "saved", "InterBertForPreTraining": "itm"}),
    "multiple_choice": (InterBertForMultipleChoice, {"InterBertForMultipleChoice": "saved", "InterBertForPreTraining": "itm"}),
    "sequence_classification": (InterBertForSequenceClassification, {
        "InterBertForSequenceClassification": "saved", "InterBertForPreTraining": "text",
        "InterBertForImageTextRetrieval": "text", "InterBertForMultipleChoice": "text", "InterBertModel": "text",
    }),
    # what scores (image, text) pairs as it is: a fine-tuned retrieval head or the pretraining ITM head
    "scoring": (None, {"InterBertForImageTextRetrieval": "saved", "InterBertForPreTraining": "saved"}),
}


def _holdings(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "it is empty"
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"it holds {shown}"


# What a model folder's weights are read from, in the order transformers looks for them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def weights_file(folder: Path) -> Path:
    """The weights file of a model folder (the folder itself when it holds none of :data:`WEIGHT_FILES`)."""
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), folder)


# The files whose bytes identify a model's weights (and a sharded checkpoint's model-0000N-of-... shards).
FINGERPRINTED_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 of a model folder's weight file(s): what a search index and an embeddings folder record, so that
    vectors are only ever compared with those the same weights made."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.name in FINGERPRINTED_WEIGHTS or p.name.startswith("model-0"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no weights ({' or '.join(FINGERPRINTED_WEIGHTS)})")
    digest = hashlib.sha256()
    for file in files:
        update_digest(digest, file)
    return digest.hexdigest()


def unreadable_weights_reason(error: BaseException) -> str | None:
    """Why a weights file could not be read, when ``error`` says the file is damaged or refused (truncated
    safetensors, a torch file that is not a zip, a pickle with code in it that ``weights_only`` blocked);
    None for any other error, which stays a bug with its traceback."""
    import pickle

    from safetensors import SafetensorError

    if isinstance(error, SafetensorError):
        return f"damaged safetensors file ({str(error).splitlines()[0][:160]})"
    if isinstance(error, pickle.UnpicklingError):
        return ("refused: it holds pickled objects other than tensors, which could run code "
                "(loaded with torch.load(weights_only=True))")
    if isinstance(error, EOFError):
        return "the file ends early (truncated?)"
    if isinstance(error, RuntimeError) and any(mark in str(error) for mark in ("PytorchStreamReader", "zip archive")):
        return f"not a readable torch file ({str(error).splitlines()[0][:160]})"
    return None


def _saved_shapes(weights: Path) -> dict[str, tuple[int, ...]] | None:
    """Each tensor's shape in a safetensors file, read from its header alone (no tensor is loaded); None for
    other formats, whose shapes cannot be known without unpickling them."""
    if weights.name != "model.safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def check_config_fits_weights(cls: type[InterBertPreTrainedModel], folder: Path, **kwargs: Any) -> None:
    """Refuse a folder whose config.json describes a model its weights file does not hold, before the model is
    built: a config is input, and one that says ``hidden_size: 1000000`` would otherwise have the model allocate
    terabytes before the weights are even compared. The model is built on the meta device (no memory), and its
    tensors' shapes are compared with the safetensors header's; for any format, a model more than 4x the weights
    file's size (at 2 bytes a parameter) is refused as well."""
    import torch

    weights = weights_file(folder)
    if not weights.is_file():
        return  # transformers names the missing file
    config = kwargs.pop("config", None)
    if config is None:
        config = InterBertConfig.from_pretrained(folder, **kwargs)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in cls(config).state_dict().items()}
    saved = _saved_shapes(weights)
    if saved is not None:
        prefix = f"{cls.base_model_prefix}."
        for name, shape in expected.items():
            stored = saved.get(name, saved.get(name.removeprefix(prefix), saved.get(prefix + name)))
            if stored is not None and stored != shape:
                raise DataError(f"{folder / 'config.json'} does not describe {weights}: {name} is "
                                f"{list(stored)} there, the config makes it {list(shape)}")
    parameters = sum(int(torch.Size(shape).numel()) for shape in expected.values())
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if weights.suffix == ".json" else weights.stat().st_size
    if 2 * parameters > 4 * size + (64 << 20):
        raise DataError(f"{folder / 'config.json'} describes {parameters:,} parameters, far more than the "
                        f"{size:,} bytes of {weights} hold: refused before building it")


def read_pretrained(cls: type[InterBertPreTrainedModel], folder: Path, **kwargs: Any) -> InterBertPreTrainedModel:
    """``cls.from_pretrained(folder, **kwargs)``; a damaged or refused weights file, or a config that does not
    describe the weights, is a DataError naming it."""
    try:
        check_config_fits_weights(cls, folder, **kwargs)
        return cls.from_pretrained(folder, **kwargs)
    except Exception as error:  # noqa: BLE001 -- only a damaged weights file is translated, anything else re-raised
        reason = unreadable_weights_reason(error)
        if reason is None:
            raise
        raise DataError(f"{weights_file(folder)}: cannot load the model's weights: {reason}") from error


def saved_architecture(folder: str | Path) -> str:
    """The InterBERT class a saved folder holds, or a UsageError saying what the folder is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such model folder (give the `model` folder a recipe wrote)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{folder} is not a model folder: no config.json ({_holdings(folder)})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{config_file}: not a JSON config ({e})") from None
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if model_type != InterBertConfig.model_type:
        hint = "; a BERT folder starts a text path with model.from_bert" if model_type == "bert" else ""
        raise UsageError(f"{folder} holds a {model_type!r} model ({', '.join(architectures) or 'no architectures'}), "
                         f"not an InterBERT one{hint}")
    known = [name for name in architectures if name in CLASSES]
    if not known:
        raise UsageError(f"{config_file}: architectures={architectures} names no InterBERT class "
                         f"(one of {', '.join(CLASSES)})")
    return known[0]


def load_model(folder: str | Path, task: str | None = None, num_labels: int | None = None,
               config_updates: Mapping[str, Any] | None = None) -> InterBertPreTrainedModel:
    """The model a saved ``folder`` gives for ``task`` (one of :data:`TASKS`; None: the saved class as it is).

    ``num_labels``: for ``sequence_classification``, the task's number of classes; a saved classifier
    must have as many, any other InterBERT gets a new classifier of that size.
    ``config_updates``: InterBertConfig fields to change (e.g. ``{"itc_loss_weight": 0.0}``); the model is
    built from the saved config with these changes, validated by InterBertConfig.
    """
    folder = Path(folder)
    name = saved_architecture(folder)

    def load(cls: type[InterBertPreTrainedModel], **config_fields: Any) -> InterBertPreTrainedModel:
        if config_updates:  # the config the model is built from, changed and validated
            return read_pretrained(cls, folder, config=updated_config(folder, {**config_updates, **config_fields}))
        return read_pretrained(cls, folder, **config_fields)

    if task is None:
        return load(CLASSES[name])
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    target, sources = TASKS[task]
    how = sources.get(name)
    if how is None:
        raise UsageError(f"{folder} holds an {name}; the {task} task loads {' or '.join(sources)}")
    if how == "itm":
        return retrieval_from_pretraining(load(InterBertForPreTraining), target)
    if how == "text":
        return load(target, **({} if num_labels is None else {"num_labels": num_labels}))
    model = load(CLASSES[name])
    if num_labels is not None and task == "sequence_classification" and model.config.num_labels != num_labels:
        raise UsageError(f"{folder} classifies into {model.config.num_labels} labels, the task has {num_labels}")
    return model


def updated_config(folder: str | Path, updates: Mapping[str, Any]) -> InterBertConfig:
    """The config saved in ``folder`` with ``updates``, validated (a field it does not have is refused)."""
    config = InterBertConfig.from_pretrained(folder)
    unknown = [key for key in updates if not hasattr(config, key)]
    if unknown:
        raise UsageError(f"{folder}: {', '.join(unknown)} is not a field of its InterBertConfig")
    config = InterBertConfig.from_pretrained(folder, **updates)
    try:
        config.validate()
    except ValueError as e:
        raise UsageError(f"{folder}: its config with {dict(updates)}: {e}") from None
    return config


__all__ = ["CLASSES", "TASKS", "load_model", "read_pretrained", "saved_architecture", "unreadable_weights_reason",
           "weights_fingerprint"]
