"""Caption readers for the layouts users bring: Karpathy split JSON, COCO caption annotations, the
Flickr8k token file (also COCO-CN's), the Flickr30k ``{"<id>.jpg": [captions..., path]}`` layout,
LAVIS / ALBEF annotation lists (``[{"image", "caption", "image_id"?}]``), and JSON lines. Every reader yields :class:`Caption`; image ids are strings everywhere so that ``1339``
from a TSV and ``"1339"`` from a JSON file name the same image.

A malformed entry is a :class:`DataFormatError` naming the file and the entry: the line for line-based
files, the image index and id (and the field) for one JSON document. Readers take ``problems`` (see
:mod:`interbert.data.text_files`): None raises the first, a list collects them all and reading goes on,
skipping the bad entries, which is how ``interbert data check`` reports every one of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from interbert.data.errors import DataFormatError
from interbert.data.text_files import load_json, report, text_lines
from interbert.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "dev": "val", "restval": "restval", "test": "test"}

Problems = list[DataFormatError] | None


@dataclass(frozen=True)
class Caption:
    image_id: str
    caption_id: str
    text: str
    split: str | None = None


def image_id_from_filename(name: str) -> str:
    """``"COCO_val2014_000000493284.jpg"`` -> ``"COCO_val2014_000000493284"``; only a known image suffix
    is dropped (Flickr8k's stray ``x.jpg.1`` stays a distinct id)."""
    name = Path(name).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _kind(value: object) -> str:
    """How a JSON value reads to a user: ``a string``, ``a number``, ``null``, ..."""
    names = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _karpathy_image_id(image: dict) -> str | None:
    if "cocoid" in image:
        return str(image["cocoid"])
    if isinstance(image.get("filename"), str):
        return image_id_from_filename(image["filename"])
    return None


def read_karpathy(path: str | Path, problems: Problems = None) -> Iterator[Caption]:
    """``images[].{filename, split, sentences[].raw, cocoid?}``; image id = cocoid when present (so it
    matches COCO-keyed features), else the file name without suffix. Two entries with one image id are
    an error: either the image is listed twice or two images would share one set of features."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFormatError(path, "not a Karpathy split file: no top-level 'images' list")
    first_entry: dict[str, int] = {}
    for n, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            report(problems, DataFormatError(path, f"images[{n}] is {_kind(image)}, not an object"))
            continue
        image_id = _karpathy_image_id(image)
        where = f"images[{n}]" + (f" (id {image_id!r})" if image_id is not None else "")
        if image_id is None:
            report(problems, DataFormatError(path, f"{where} has neither 'cocoid' nor 'filename' to name its image"))
            continue
        if image_id in first_entry:
            report(problems, DataFormatError(path, f"{where}: image id {image_id!r} is also images[{first_entry[image_id]}]"
                                                   " (listed twice, or two images with one id)"))
            continue
        first_entry[image_id] = n
        sentences = image.get("sentences")
        if not isinstance(sentences, list):
            found = "no 'sentences'" if "sentences" not in image else f"'sentences' is {_kind(sentences)}"
            report(problems, DataFormatError(path, f"{where}: {found}; expected a list of {{\"raw\": <caption>}} objects"))
            continue
        split = SPLIT_NAMES.get(image.get("split"), image.get("split"))
        for k, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                found = (f"is {_kind(sentence)}, not an object" if not isinstance(sentence, dict)
                         else "has no 'raw' caption text" if "raw" not in sentence else f"'raw' is {_kind(raw)}, not text")
                report(problems, DataFormatError(path, f"{where}: sentences[{k}] {found}"))
                continue
            caption_id = str(sentence.get("sentid", f"{image_id}#{k}"))
            yield Caption(image_id, caption_id, raw.strip(), split)


def read_karpathy_twins(path: str | Path) -> dict[str, str]:
    """Image id -> its twin's image id, from the ``twin_of`` key (an ``imgid``) that the built-in benchmark
    (``interbert data synth``) puts on the entries of twin images in its Karpathy file. A ``twin_of`` that
    names no ``imgid`` of the file, or a pair that is not mutual, is a :class:`DataFormatError` naming the entry."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFormatError(path, "not a Karpathy split file: no top-level 'images' list")
    entries = [(n, image) for n, image in enumerate(data["images"]) if isinstance(image, dict)]
    by_imgid = {image["imgid"]: _karpathy_image_id(image) for _, image in entries if "imgid" in image}
    twins: dict[str, str] = {}
    for n, image in entries:
        if "twin_of" not in image:
            continue
        image_id, twin = _karpathy_image_id(image), by_imgid.get(image["twin_of"])
        if twin is None or twin == image_id:
            raise DataFormatError(path, f"images[{n}] (id {image_id!r}): twin_of {image['twin_of']!r} names no other "
                                        "image's imgid in this file")
        twins[image_id] = twin
    for image_id, twin in twins.items():
        if twins.get(twin) != image_id:
            raise DataFormatError(path, f"image {image_id!r} names {twin!r} as its twin, but {twin!r} names "
                                        f"{twins.get(twin)!r}: twins must name each other")
    return twins


def read_coco(path: str | Path, split: str | None = None, problems: Problems = None) -> Iterator[Caption]:
    """COCO caption annotations: ``annotations[].{image_id, id, caption}``."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataFormatError(path, "not a COCO caption file: no top-level 'annotations' list")
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            where = f"annotations[{n}]" + (f" (image id {ann['image_id']!r})" if isinstance(ann, dict) and "image_id" in ann else "")
            report(problems, DataFormatError(path, f"{where} needs 'image_id' and a 'caption' string"))
            continue
        yield Caption(str(ann["image_id"]), str(ann.get("id", f"{ann['image_id']}#{n}")), ann["caption"].strip(), split)


def read_token_file(path: str | Path, split: str | None = None, problems: Problems = None) -> Iterator[Caption]:
    """Flickr8k's ``Flickr8k.token.txt`` (``<file>.jpg#N<TAB>caption``); COCO-CN uses the same shape."""
    path = Path(path)
    for line_no, line in text_lines(path, problems):
        if not line.strip():
            continue
        key, sep, text = line.partition("\t")
        name, hash_, number = key.rpartition("#")
        if not sep or not hash_ or not text.strip():
            report(problems, DataFormatError(path, f"expected '<image>#<n><TAB><caption>', got {line[:80]!r}", line=line_no))
            continue
        image_id = image_id_from_filename(name)
        yield Caption(image_id, f"{image_id}#{number}", text.strip(), split)


def read_flickr30k(path: str | Path, split: str | None = None, problems: Problems = None) -> Iterator[Caption]:
    """``{"<id>.jpg": [caption, ..., "<folder>/<id>.jpg"]}`` (a trailing image path is ignored), or
    ``{"<id>.jpg": {"captions": [...], "split...": ...}}``. The split defaults to the file's name
    (``test.json`` -> test, ``validation.json`` -> val)."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, "not a Flickr30k caption file: expected an object keyed by image file name")
    split = split or SPLIT_NAMES.get(path.stem.lower())
    for name, value in data.items():
        image_split = split
        if isinstance(value, dict):
            image_split = next((SPLIT_NAMES.get(v, v) for k, v in value.items() if k.startswith("split")), split)
            value = value.get("captions")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            report(problems, DataFormatError(path, f"entry {name!r}: expected a list of caption strings"))
            continue
        image_id = image_id_from_filename(name)
        texts = [v for v in value if not v.lower().endswith(IMAGE_SUFFIXES)]
        for k, text in enumerate(texts):
            yield Caption(image_id, f"{image_id}#{k}", text.strip(), image_split)


def split_from_file_name(path: Path) -> str | None:
    """The split a file's name says: the last of its name's ``_``/``-``/``.``-separated words that names
    one (``coco_karpathy_train.json`` -> train, ``flickr30k-val.json`` -> val), None when none does."""
    words = re.split(r"[_\-.]", path.stem.lower())
    return next((SPLIT_NAMES[w] for w in reversed(words) if w in SPLIT_NAMES), None)


def read_annotation_list(path: str | Path, split: str | None = None, problems: Problems = None) -> Iterator[Caption]:
    """LAVIS's and ALBEF's annotation lists: ``[{"image": "<folder>/<file>.jpg", "caption": ..., "image_id"?,
    "split"?}]``, e.g. LAVIS's ``coco_karpathy_train.json`` (one caption string per entry, an image over
    several entries) or its val/test files (a list of captions per entry, no ``image_id``).

    The image id is the entry's ``image_id`` when it has one (LAVIS's train files: ``"coco_391895"``),
    else the file name of ``image`` without its suffix (``COCO_val2014_000000391895``) — so the feature
    store must be keyed the same way as the file's ids. The split is the entry's ``split`` field when
    present, else ``split`` when given, else the one the file's name says (:func:`split_from_file_name`)."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, "not an annotation list: expected a top-level JSON list of "
                                    '{"image": ..., "caption": ...} objects')
    file_split = split or split_from_file_name(path)
    captions_of_image: dict[str, int] = {}  # numbers an image's captions across its entries
    for n, entry in enumerate(data):
        if not isinstance(entry, dict):
            report(problems, DataFormatError(path, f"[{n}] is {_kind(entry)}, not an object"))
            continue
        image, image_id = entry.get("image"), entry.get("image_id")
        if image_id is None and not isinstance(image, str):
            found = "no 'image'" if "image" not in entry else f"'image' is {_kind(image)}"
            report(problems, DataFormatError(path, f"[{n}] has {found} and no 'image_id' to name its image"))
            continue
        if image_id is not None and not isinstance(image_id, (str, int)):
            report(problems, DataFormatError(path, f"[{n}]: 'image_id' is {_kind(image_id)}, not a string or number"))
            continue
        image_id = str(image_id) if image_id is not None else image_id_from_filename(image)
        where = f"[{n}] (image {image_id!r})"
        texts = entry.get("caption")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            found = "no 'caption'" if "caption" not in entry else f"'caption' is {_kind(entry['caption'])}"
            if isinstance(texts, list) and texts:
                found = "'caption' is a list holding a non-string"
            report(problems, DataFormatError(path, f"{where}: {found}; expected a caption string or a list of them"))
            continue
        entry_split = entry.get("split")
        entry_split = SPLIT_NAMES.get(entry_split, entry_split) if isinstance(entry_split, str) else file_split
        for text in texts:
            k = captions_of_image.get(image_id, 0)
            captions_of_image[image_id] = k + 1
            yield Caption(image_id, f"{image_id}#{k}", text.strip(), entry_split)


def read_jsonl(path: str | Path, problems: Problems = None) -> Iterator[Caption]:
    """One object per line: ``{"image_id", "caption", "split"?, "caption_id"?}``."""
    path = Path(path)
    for line_no, line in text_lines(path, problems):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report(problems, DataFormatError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=line_no))
            continue
        if not isinstance(row, dict) or "image_id" not in row or not isinstance(row.get("caption"), str):
            report(problems, DataFormatError(path, "expected an object with 'image_id' and a 'caption' string", line=line_no))
            continue
        image_id = str(row["image_id"])
        caption_id = str(row.get("caption_id", f"{image_id}#{line_no}"))
        yield Caption(image_id, caption_id, row["caption"].strip(), row.get("split"))


READERS = {
    "karpathy": read_karpathy,
    "coco": read_coco,
    "flickr8k": read_token_file,
    "flickr30k": read_flickr30k,
    "jsonl": read_jsonl,
    "lavis": read_annotation_list,
}


def sniff_caption_format(path: str | Path) -> str:
    """Guess the layout from the file's first bytes (and, for one JSON document, its top-level keys)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return "jsonl"
    with open(path, "rb") as f:
        # only to guess the layout: a byte that is not UTF-8 is reported by the reader, with its line
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff")
    stripped = head.lstrip()
    if not stripped:
        raise DataFormatError(path, "empty file: no captions")
    if not stripped.startswith(("{", "[")):
        first = stripped.splitlines()[0]
        if "\t" in first and "#" in first.split("\t")[0]:
            return "flickr8k"
        raise DataFormatError(path, "unknown caption format (not JSON, not '<image>#<n><TAB><caption>' lines)", line=1)
    lines = [ln for ln in stripped.splitlines() if ln.strip()]
    if len(lines) > 1:  # one object per line, unless the first line is only the start of a document
        try:
            first = json.loads(lines[0])
            if isinstance(first, dict) and "caption" in first:
                return "jsonl"
        except json.JSONDecodeError:
            pass
    data = load_json(path)  # one document: decide on its keys
    if isinstance(data, dict):
        # COCO files also hold an 'images' list (without sentences), so 'annotations' decides first;
        # any other 'images' list is Karpathy's, whose reader then names an entry that lacks its sentences
        if isinstance(data.get("annotations"), list):
            return "coco"
        if isinstance(data.get("images"), list):
            return "karpathy"
        if data and all(k.lower().endswith(IMAGE_SUFFIXES) for k in list(data)[:10]):
            return "flickr30k"
    # a list of objects with a caption: LAVIS's / ALBEF's annotation list; its reader names a bad entry
    if isinstance(data, list) and data and isinstance(data[0], dict) and "caption" in data[0]:
        return "lavis"
    raise DataFormatError(path, "unknown caption format (JSON, but neither Karpathy, COCO, Flickr30k nor a "
                                'LAVIS/ALBEF list of {"image", "caption"} objects)')


def blank_captions(captions: Iterable[Caption]) -> list[Caption]:
    """Captions with no text (empty or only whitespace): an image paired with nothing teaches nothing."""
    return [c for c in captions if not c.text.strip()]


def blank_captions_message(path: str | Path, blank: list[Caption], shown: int = 5) -> str:
    """``captions.json: 2 blank captions (empty or whitespace): '11' of image '2', '25' of image '5'``: the file,
    the count, the first caption ids with their images (for JSON lines the id ends in ``#<line number>``)."""
    listed = ", ".join(f"{c.caption_id!r} of image {c.image_id!r}" for c in blank[:shown])
    listed += ", ..." if len(blank) > shown else ""
    return f"{path}: {len(blank)} blank caption{'s' if len(blank) != 1 else ''} (empty or whitespace): {listed}"


def read_captions(path: str | Path, format: str = "auto", problems: Problems = None) -> list[Caption]:
    """All captions of ``path``; ``format`` is one of ``auto``, ``karpathy``, ``coco``, ``flickr8k``,
    ``flickr30k``, ``jsonl``, ``lavis`` (LAVIS / ALBEF annotation lists). With ``problems`` a list,
    malformed entries are recorded there and skipped."""
    if format not in ("auto", *READERS):
        raise UsageError(f"unknown caption format {format!r}; choose auto or one of {sorted(READERS)}")
    if format == "auto":
        format = sniff_caption_format(path)
    found = len(problems) if problems is not None else 0
    captions = list(READERS[format](path, problems=problems))
    if not captions and (problems is None or len(problems) == found):  # else the problems say why
        raise DataFormatError(path, f"no captions ({format} layout)")
    return captions
