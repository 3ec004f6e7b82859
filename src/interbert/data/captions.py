"""Caption readers for the layouts users bring: Karpathy split JSON, COCO caption annotations, the
Flickr8k token file (also COCO-CN's), the Flickr30k ``{"<id>.jpg": [captions..., path]}`` layout, and
JSON lines. Every reader yields :class:`Caption`; image ids are strings everywhere so that ``1339``
from a TSV and ``"1339"`` from a JSON file name the same image."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from interbert.data.errors import DataFormatError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "dev": "val", "restval": "restval", "test": "test"}


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


def _load_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=e.lineno) from None


def read_karpathy(path: str | Path) -> Iterator[Caption]:
    """``images[].{filename, split, sentences[].raw, cocoid?}``; image id = cocoid when present (so it
    matches COCO-keyed features), else the file name without suffix."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFormatError(path, "not a Karpathy split file: no top-level 'images' list")
    for n, image in enumerate(data["images"]):
        if "sentences" not in image or ("cocoid" not in image and "filename" not in image):
            raise DataFormatError(path, f"images[{n}] lacks 'sentences' or an id ('cocoid'/'filename')")
        image_id = str(image["cocoid"]) if "cocoid" in image else image_id_from_filename(image["filename"])
        split = SPLIT_NAMES.get(image.get("split"), image.get("split"))
        for k, sentence in enumerate(image["sentences"]):
            caption_id = str(sentence.get("sentid", f"{image_id}#{k}"))
            yield Caption(image_id, caption_id, sentence["raw"].strip(), split)


def read_coco(path: str | Path, split: str | None = None) -> Iterator[Caption]:
    """COCO caption annotations: ``annotations[].{image_id, id, caption}``."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataFormatError(path, "not a COCO caption file: no top-level 'annotations' list")
    for n, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or "caption" not in ann:
            raise DataFormatError(path, f"annotations[{n}] lacks 'image_id' or 'caption'")
        yield Caption(str(ann["image_id"]), str(ann.get("id", f"{ann['image_id']}#{n}")), ann["caption"].strip(), split)


def read_token_file(path: str | Path, split: str | None = None) -> Iterator[Caption]:
    """Flickr8k's ``Flickr8k.token.txt`` (``<file>.jpg#N<TAB>caption``); COCO-CN uses the same shape."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, sep, text = line.partition("\t")
            name, hash_, number = key.rpartition("#")
            if not sep or not hash_ or not text.strip():
                raise DataFormatError(path, f"expected '<image>#<n><TAB><caption>', got {line[:80]!r}", line=line_no)
            image_id = image_id_from_filename(name)
            yield Caption(image_id, f"{image_id}#{number}", text.strip(), split)


def read_flickr30k(path: str | Path, split: str | None = None) -> Iterator[Caption]:
    """``{"<id>.jpg": [caption, ..., "<folder>/<id>.jpg"]}`` (a trailing image path is ignored), or
    ``{"<id>.jpg": {"captions": [...], "split...": ...}}``. The split defaults to the file's name
    (``test.json`` -> test, ``validation.json`` -> val)."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, "not a Flickr30k caption file: expected an object keyed by image file name")
    split = split or SPLIT_NAMES.get(path.stem.lower())
    for name, value in data.items():
        image_split = split
        if isinstance(value, dict):
            image_split = next((SPLIT_NAMES.get(v, v) for k, v in value.items() if k.startswith("split")), split)
            value = value.get("captions")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataFormatError(path, f"entry {name!r}: expected a list of caption strings")
        image_id = image_id_from_filename(name)
        texts = [v for v in value if not v.lower().endswith(IMAGE_SUFFIXES)]
        for k, text in enumerate(texts):
            yield Caption(image_id, f"{image_id}#{k}", text.strip(), image_split)


def read_jsonl(path: str | Path) -> Iterator[Caption]:
    """One object per line: ``{"image_id", "caption", "split"?, "caption_id"?}``."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=line_no) from None
            if not isinstance(row, dict) or "image_id" not in row or "caption" not in row:
                raise DataFormatError(path, "expected an object with 'image_id' and 'caption'", line=line_no)
            image_id = str(row["image_id"])
            caption_id = str(row.get("caption_id", f"{image_id}#{line_no}"))
            yield Caption(image_id, caption_id, str(row["caption"]).strip(), row.get("split"))


READERS = {
    "karpathy": read_karpathy,
    "coco": read_coco,
    "flickr8k": read_token_file,
    "flickr30k": read_flickr30k,
    "jsonl": read_jsonl,
}


def sniff_caption_format(path: str | Path) -> str:
    """Guess the layout from the file's first bytes (and, for one JSON document, its top-level keys)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return "jsonl"
    with open(path, encoding="utf-8") as f:
        head = f.read(4096)
    stripped = head.lstrip()
    if not stripped.startswith(("{", "[")):
        first = stripped.splitlines()[0] if stripped else ""
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
    data = _load_json(path)  # one document: decide on its keys
    if isinstance(data, dict):
        if isinstance(data.get("images"), list) and data["images"] and "sentences" in data["images"][0]:
            return "karpathy"
        if isinstance(data.get("annotations"), list):
            return "coco"
        if data and all(k.lower().endswith(IMAGE_SUFFIXES) for k in list(data)[:10]):
            return "flickr30k"
    raise DataFormatError(path, "unknown caption format (JSON, but neither Karpathy, COCO nor Flickr30k layout)")


def read_captions(path: str | Path, format: str = "auto") -> list[Caption]:
    """All captions of ``path``; ``format`` is one of ``auto``, ``karpathy``, ``coco``, ``flickr8k``,
    ``flickr30k``, ``jsonl``."""
    if format == "auto":
        format = sniff_caption_format(path)
    if format not in READERS:
        raise ValueError(f"unknown caption format {format!r}; choose auto or one of {sorted(READERS)}")
    return list(READERS[format](path))
