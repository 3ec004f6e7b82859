"""VCR (Visual Commonsense Reasoning): annotation lines + metadata JSONs -> 4-way multiple-choice examples.

A VCR line holds a question, 4 answer choices and 4 rationale choices as token lists in which an
object tag is a list of indices into the image's detections (``["Why", "is", [0], "smiling", "at",
[1], "?"]``), plus ``objects`` (the detections' class names), ``img_fn``/``metadata_fn`` (relative to
the images root) and the labels. The metadata JSON beside each frame holds the detections' ``boxes``
(x1, y1, x2, y2, score in pixels), ``segms``, ``names``, ``width``, ``height``.

What this module does with them, as the published VCR models do:

- Tags become words: a person gets a gender-neutral name picked by its person index (the first
  person in ``objects`` is Casey, the second Riley, ...), another object its class name; a tag list
  ``[1, 2]`` reads "Riley and bottle".
- Q->A input is ``[CLS] question [SEP] answer [SEP]``; QA->R conditions on the ground-truth answer:
  ``[CLS] question answer [SEP] rationale [SEP]`` (segment 0 then segment 1).
- Regions: the global region, then the tagged objects' boxes (in order of first mention, so the
  model can ground a name on a position), then the image's other regions up to ``max_regions``.
  With a feature store (keyed by the image id, the stem of ``img_fn``) a tagged box takes the feature
  of the store's region that overlaps it most; without one, :func:`vcr_standin_features` supplies a
  deterministic stand-in from the metadata (the real sample ships no features), so the reader and the
  grounding run end to end.

Every malformed line or missing metadata file raises :class:`DataFormatError` naming file and line.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from interbert.data import META
from interbert.data.batches import prepare_regions
from interbert.data.captions import image_id_from_filename
from interbert.data.errors import DataFormatError
from interbert.data.features import FeatureStore, Regions
from interbert.data.text_files import load_json, report, text_lines
from interbert.errors import DataError

# Gender-neutral names for people, as VCR models do (R2C, VL-BERT); the person index picks one.
PERSON_NAMES = ("Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody", "Kendall",
                "Skyler", "Frankie", "Pat", "Quinn")
TASKS = ("Q->A", "QA->R")
NUM_CHOICES = 4

Token = str | list[int]


@dataclass(frozen=True)
class VcrMetadata:
    """One frame's detections (the metadata JSON without its segmentation polygons)."""

    boxes: np.ndarray  # N x 4 float32, x1 y1 x2 y2 pixels
    scores: np.ndarray  # N float32
    names: list[str]
    width: int
    height: int


@dataclass(frozen=True)
class VcrItem:
    """One VCR question with its choices, labels and where it came from."""

    annot_id: str
    image_id: str  # the feature store key: stem of img_fn
    objects: list[str]
    question: list[Token]
    answer_choices: list[list[Token]]
    rationale_choices: list[list[Token]]
    answer_label: int
    rationale_label: int
    metadata: VcrMetadata
    source: str  # "file:line"


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def read_metadata(path: str | Path) -> VcrMetadata:
    """A VCR metadata JSON; a missing or malformed file raises :class:`DataFormatError` naming it."""
    path = Path(path)
    try:
        raw = load_json(path)
    except FileNotFoundError:
        raise DataFormatError(path, "metadata file not found") from None
    except OSError as e:  # e.g. metadata_fn "" names the images folder itself
        raise DataFormatError(path, f"cannot read the metadata file ({e.strerror or e})") from None
    except DataFormatError as e:
        raise DataFormatError(path, f"not valid JSON ({str(e).split(': ', 1)[-1]})", e.line) from None
    if not isinstance(raw, dict):
        raise DataFormatError(path, "metadata must be a JSON object")
    missing = [k for k in ("boxes", "names", "width", "height") if k not in raw]
    if missing:
        raise DataFormatError(path, f"metadata lacks {missing}")
    try:
        boxes = np.asarray(raw["boxes"] or np.zeros((0, 5)), dtype=np.float32).reshape(-1, 5)
        width, height = int(raw["width"]), int(raw["height"])
    except (TypeError, ValueError):
        raise DataFormatError(path, "metadata 'boxes' must be [x1, y1, x2, y2, score] numbers and 'width'/'height' "
                                    "whole numbers") from None
    if not isinstance(raw["names"], list) or len(boxes) != len(raw["names"]):
        raise DataFormatError(path, f"{len(boxes)} boxes but {len(raw['names'])} names"
                              if isinstance(raw["names"], list) else "metadata 'names' must be a list")
    return VcrMetadata(boxes[:, :4].copy(), boxes[:, 4].copy(), [str(n) for n in raw["names"]], width, height)


def _check_tokens(tokens: object, num_objects: int, what: str) -> str | None:
    """Why ``tokens`` is not a valid VCR token list (None when it is)."""
    if not isinstance(tokens, list) or not tokens:
        return f"{what} must be a non-empty list of tokens"
    for token in tokens:
        if isinstance(token, list):
            if not token or not all(isinstance(i, int) and not isinstance(i, bool) for i in token):
                return f"{what} has a bad object tag {token!r}"
            bad = [i for i in token if not 0 <= i < num_objects]
            if bad:
                return f"{what} tags object(s) {bad}, but the image has {num_objects} objects"
        elif not isinstance(token, str):
            return f"{what} has a token that is neither a word nor a tag list: {token!r}"
    return None


def parse_vcr_line(raw: dict, path: Path, line: int, images_root: Path, metadata_cache: dict) -> VcrItem:
    """One annotation line -> :class:`VcrItem`, checked against its metadata."""
    required = ("question", "answer_choices", "rationale_choices", "answer_label", "rationale_label", "objects",
                "img_fn", "metadata_fn")
    missing = [k for k in required if k not in raw]
    if missing:
        raise DataFormatError(path, f"missing field(s) {missing}", line)
    wrong = [k for k in ("img_fn", "metadata_fn") if not isinstance(raw[k], str) or not raw[k]]
    if wrong:
        raise DataFormatError(path, f"{' and '.join(wrong)} must be a file name", line)
    if not isinstance(raw["objects"], list) or not all(isinstance(o, str) for o in raw["objects"]):
        raise DataFormatError(path, "objects must be a list of class names", line)
    metadata_file = images_root / raw["metadata_fn"]
    if metadata_file not in metadata_cache and not metadata_file.is_file():  # most often the images root is wrong
        raise DataFormatError(path, f"metadata_fn {raw['metadata_fn']!r}: no such file in {images_root} (the folder it "
                                    "is relative to: data.images_root / --images-root)", line)
    if metadata_file not in metadata_cache:
        try:
            metadata_cache[metadata_file] = read_metadata(metadata_file)
        except DataFormatError as e:
            raise DataFormatError(path, f"metadata {raw['metadata_fn']!r}: {e}", line) from None
    metadata = metadata_cache[metadata_file]
    objects = raw["objects"]
    if len(objects) > len(metadata.names) or list(metadata.names[: len(objects)]) != list(objects):
        raise DataFormatError(path, f"objects {objects} do not match the names in {metadata_file}", line)
    problems = [_check_tokens(raw["question"], len(objects), "question")]
    for field in ("answer_choices", "rationale_choices"):
        choices = raw[field]
        if not isinstance(choices, list) or len(choices) != NUM_CHOICES:
            raise DataFormatError(path, f"{field} must hold {NUM_CHOICES} choices", line)
        problems += [_check_tokens(c, len(objects), f"{field}[{k}]") for k, c in enumerate(choices)]
    for label in ("answer_label", "rationale_label"):
        if isinstance(raw[label], bool) or raw[label] not in range(NUM_CHOICES):
            problems.append(f"{label} must be 0-{NUM_CHOICES - 1}, got {raw[label]!r}")
    problems = [p for p in problems if p]
    if problems:
        raise DataFormatError(path, "; ".join(problems), line)
    return VcrItem(
        annot_id=str(raw.get("annot_id", f"{path.name}:{line}")),
        image_id=image_id_from_filename(raw["img_fn"]),
        objects=list(objects),
        question=raw["question"],
        answer_choices=raw["answer_choices"],
        rationale_choices=raw["rationale_choices"],
        answer_label=int(raw["answer_label"]),
        rationale_label=int(raw["rationale_label"]),
        metadata=metadata,
        source=f"{path}:{line}",
    )


def read_vcr(path: str | Path, images_root: str | Path | None = None,
             problems: list[DataFormatError] | None = None) -> list[VcrItem]:
    """All lines of a VCR jsonl file. ``images_root``: the folder ``metadata_fn`` is relative to
    (default: ``vcr1images`` beside the file when it exists, else the file's folder). ``problems``: as
    the caption readers (None raises the first bad line; a list collects them and skips those lines)."""
    path = Path(path)
    if images_root is None:
        beside = path.parent / "vcr1images"
        images_root = beside if beside.is_dir() else path.parent
    images_root = Path(images_root)
    items, cache = [], {}
    found = len(problems) if problems is not None else 0
    for line_no, line in text_lines(path, problems):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            report(problems, DataFormatError(path, f"not valid JSON: {e.msg} (column {e.colno})", line_no))
            continue
        if not isinstance(raw, dict):
            report(problems, DataFormatError(path, "a line must be a JSON object", line_no))
            continue
        try:
            items.append(parse_vcr_line(raw, path, line_no, images_root, cache))
        except DataFormatError as e:
            report(problems, e)
    if not items and (problems is None or len(problems) == found):  # else the problems say why
        raise DataFormatError(path, "no VCR lines")
    return items


# --------------------------------------------------------------------------------------------------
# Tags -> words, and the texts of the two tasks
# --------------------------------------------------------------------------------------------------
def object_names(objects: Sequence[str]) -> list[str]:
    """The word each detection is called by: persons by a gender-neutral name in person order
    (wrapping around after the 14th person), other objects by their class name."""
    names, persons = [], 0
    for kind in objects:
        if kind == "person":
            names.append(PERSON_NAMES[persons % len(PERSON_NAMES)])
            persons += 1
        else:
            names.append(kind)
    return names


def _join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def render_tokens(tokens: Sequence[Token], names: Sequence[str]) -> str:
    """A token list as text, each tag replaced by its objects' names."""
    return " ".join(_join_names([names[i] for i in t]) if isinstance(t, list) else t for t in tokens)


def mentioned_objects(token_lists: Sequence[Sequence[Token]]) -> list[int]:
    """Object indices in order of first mention."""
    seen: dict[int, None] = {}
    for tokens in token_lists:
        for t in tokens:
            if isinstance(t, list):
                seen.update(dict.fromkeys(t))
    return list(seen)


def task_texts(item: VcrItem, task: str) -> list[tuple[str, str]]:
    """The 4 (first segment, second segment) texts of a task: Q->A pairs the question with each
    answer; QA->R pairs question + the ground-truth answer with each rationale."""
    names = object_names(item.objects)
    question = render_tokens(item.question, names)
    if task == "Q->A":
        return [(question, render_tokens(a, names)) for a in item.answer_choices]
    if task == "QA->R":
        context = question + " " + render_tokens(item.answer_choices[item.answer_label], names)
        return [(context, render_tokens(r, names)) for r in item.rationale_choices]
    raise ValueError(f"unknown VCR task {task!r}; choose one of {TASKS}")


def task_label(item: VcrItem, task: str) -> int:
    return item.answer_label if task == "Q->A" else item.rationale_label


def task_objects(item: VcrItem, task: str) -> list[int]:
    """The objects a task's inputs mention, in order of first mention."""
    if task == "Q->A":
        return mentioned_objects([item.question, *item.answer_choices])
    return mentioned_objects([item.question, item.answer_choices[item.answer_label], *item.rationale_choices])


# --------------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------------
def _name_code(name: str, dim: int) -> np.ndarray:
    # zlib.crc32 is stable across processes and Python versions (hash() is salted per process).
    return np.random.default_rng(zlib.crc32(name.encode("utf-8"))).standard_normal(dim).astype(np.float32)


def vcr_standin_features(boxes: np.ndarray, names: Sequence[str], width: int, height: int, dim: int) -> np.ndarray:
    """Stand-in region features for VCR frames that have no detector features (the real sample).

    A detection's feature is a fixed random code of its class name (seeded by the name's CRC32, so the
    same on every machine) plus its normalised box geometry (x1, y1, x2, y2, area) in the first 5
    dimensions. Not a visual feature: it carries exactly what the metadata knows (which class, where),
    which is what exercising the reader and the tag grounding end to end needs.
    """
    if dim < 5:
        raise ValueError(f"stand-in features need dim >= 5, got {dim}")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) != len(names):
        raise ValueError(f"{len(boxes)} boxes but {len(names)} names")
    scale = np.array([width, height, width, height], dtype=np.float32)
    norm = np.clip(boxes / scale, 0.0, 1.0)
    area = (norm[:, 2] - norm[:, 0]) * (norm[:, 3] - norm[:, 1])
    features = np.stack([_name_code(n, dim) for n in names]) if len(names) else np.zeros((0, dim), np.float32)
    features[:, :5] += np.concatenate([norm, area[:, None]], 1)
    return features


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N x 4) with every box in ``b`` (M x 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def item_regions(item: VcrItem, objects: Sequence[int], store: FeatureStore | None, feature_dim: int,
                 max_regions: int) -> Regions:
    """The regions of one item, tagged objects first (in ``objects`` order), then the image's others.

    With a store, a tagged object's feature is that of the store region it overlaps most (its box is the
    metadata box), and the others are the store's regions; without one, every metadata detection gets
    its :func:`vcr_standin_features` feature, tagged ones first.
    """
    meta = item.metadata
    tagged = np.asarray(list(objects), dtype=int)
    if store is None:
        first = set(tagged.tolist())
        order = np.concatenate([tagged, [i for i in range(len(meta.names)) if i not in first]]).astype(int)
        features = vcr_standin_features(meta.boxes[order], [meta.names[i] for i in order], meta.width, meta.height, feature_dim)
        return Regions(features, meta.boxes[order], meta.width, meta.height)
    if item.image_id not in store:
        raise DataError(f"{item.source}: image id {item.image_id!r} (from img_fn) is not in the feature store {store.path}")
    detected = store[item.image_id]
    boxes = meta.boxes[tagged]
    if len(tagged):
        if detected.num_regions == 0:
            raise DataError(f"{item.source}: the feature store {store.path} has no regions for image {item.image_id!r}")
        best = box_iou(boxes, detected.boxes).argmax(1)
        features = detected.features[best]
    else:
        features = np.zeros((0, detected.features.shape[1]), np.float32)
    room = max(0, max_regions - 1 - len(tagged))
    return Regions(np.concatenate([features, detected.features[:room]]), np.concatenate([boxes, detected.boxes[:room]]),
                   detected.image_w, detected.image_h)


# --------------------------------------------------------------------------------------------------
# Dataset and collate
# --------------------------------------------------------------------------------------------------
def encode_choices(tokenizer, pairs: Sequence[tuple[str, str]], max_tokens: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``[CLS] first [SEP] second [SEP]`` per choice, truncated to ``max_tokens`` (longest segment first)."""
    enc = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation="longest_first", max_length=max_tokens)
    return ([np.asarray(x, dtype=np.int64) for x in enc["input_ids"]],
            [np.asarray(x, dtype=np.int64) for x in enc["token_type_ids"]])


class VcrDataset(torch.utils.data.Dataset):
    """One example per (item, task): 4 texts sharing one region list, and the right choice.

    ``tasks``: which of ``Q->A`` / ``QA->R`` to build; with both, each item appears twice (index
    ``k * len(items) + n`` is task k of item n), which trains one model on both tasks.
    """

    def __init__(self, items: Sequence[VcrItem], tokenizer, store: FeatureStore | None = None, tasks: Sequence[str] = TASKS,
                 max_tokens: int = 64, max_regions: int = 36, feature_dim: int | None = None):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
        if store is None and not feature_dim:
            raise ValueError("without a feature store give feature_dim for the stand-in features")
        self.items, self.tokenizer, self.store, self.tasks = list(items), tokenizer, store, list(tasks)
        self.max_tokens, self.max_regions = max_tokens, max_regions
        self.feature_dim = store.feature_dim if store is not None else int(feature_dim)
        if store is not None:
            missing = [it for it in self.items if it.image_id not in store]
            if missing:
                raise DataError(f"{len(missing)} VCR item(s) have no features in {store.path}; the first is "
                               f"{missing[0].source}, image id {missing[0].image_id!r} (the stem of its img_fn)")

    def __len__(self) -> int:
        return len(self.items) * len(self.tasks)

    def __getitem__(self, index: int) -> dict:
        task, item = self.tasks[index // len(self.items)], self.items[index % len(self.items)]
        input_ids, token_type_ids = encode_choices(self.tokenizer, task_texts(item, task), self.max_tokens)
        objects = task_objects(item, task)[: max(0, self.max_regions - 1)]
        regions = prepare_regions(item_regions(item, objects, self.store, self.feature_dim, self.max_regions),
                                  self.max_regions)
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "region_features": regions["region_features"],
                "region_boxes": regions["region_boxes"], "labels": task_label(item, task), "task": task,
                "annot_id": item.annot_id}


def collate_choices(examples: Sequence[dict], pad_token_id: int = 0) -> dict:
    """Pad to ``B x choices x longest`` text and ``B x regions`` (shared by the choices)."""
    b, c = len(examples), len(examples[0]["input_ids"])
    longest = max(len(ids) for e in examples for ids in e["input_ids"])
    input_ids = torch.full((b, c, longest), pad_token_id, dtype=torch.long)
    token_type_ids = torch.zeros((b, c, longest), dtype=torch.long)
    attention_mask = torch.zeros((b, c, longest), dtype=torch.long)
    for i, e in enumerate(examples):
        for k, (ids, types) in enumerate(zip(e["input_ids"], e["token_type_ids"])):
            input_ids[i, k, : len(ids)] = torch.from_numpy(ids)
            token_type_ids[i, k, : len(types)] = torch.from_numpy(types)
            attention_mask[i, k, : len(ids)] = 1
    most = max(len(e["region_features"]) for e in examples)
    dim = examples[0]["region_features"].shape[1]
    features, boxes = torch.zeros((b, most, dim)), torch.zeros((b, most, 5))
    region_mask = torch.zeros((b, most), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["region_features"])
        features[i, :n], boxes[i, :n], region_mask[i, :n] = torch.from_numpy(e["region_features"]), torch.from_numpy(e["region_boxes"]), 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "region_features": features, "region_boxes": boxes, "region_mask": region_mask,
            "labels": torch.tensor([int(e["labels"]) for e in examples]),
            META: {"tasks": [e["task"] for e in examples], "annot_ids": [e["annot_id"] for e in examples]}}
