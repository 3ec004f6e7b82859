"""Boxes given by the user instead of detected ones (``interbert extract --boxes FILE``).

Two sources, both with boxes in original-image pixels:

- COCO instance annotations: the official JSON (``images``/``annotations``/``categories``), a bare
  list of annotation objects, or JSON lines of annotations (or lists of them). ``bbox`` is
  ``[x, y, width, height]``.
- VCR metadata JSONs (one per image; a folder of them or a single file): ``boxes`` rows
  ``x1, y1, x2, y2, score``, ``width``, ``height``, ``names``. VCR trains on these ground-truth boxes.

Each source becomes ``{key: GivenBoxes}``; :func:`match_given_boxes` pairs keys with image ids.
Pure python + numpy: no torch needed here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class GivenBoxes:
    boxes: np.ndarray  # N x 4 float32, x1 y1 x2 y2 pixels
    scores: np.ndarray  # N float32 (1.0 for annotations)
    names: list[str]
    width: int | None  # the image size the boxes refer to, when the source states it
    height: int | None
    source: str  # where they came from, for error messages


def read_given_boxes(path: str | Path) -> dict[str, GivenBoxes]:
    """Read a COCO annotation file or VCR metadata (file or folder), detecting which it is."""
    path = Path(path)
    if path.is_dir():
        return read_vcr_metadata_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"--boxes: {path} does not exist")
    documents = _read_json_or_json_lines(path)
    if len(documents) == 1 and isinstance(documents[0][1], dict) and "boxes" in documents[0][1]:
        return {path.stem: vcr_metadata_boxes(documents[0][1], source=str(path))}
    return coco_annotation_boxes(documents, path)


def _read_json_or_json_lines(path: Path) -> list[tuple[int, object]]:
    """``[(line number, parsed value)]``: the whole file as one JSON value, else one per line."""
    text = path.read_text(encoding="utf-8")
    try:
        return [(1, json.loads(text))]
    except json.JSONDecodeError:
        pass
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            documents.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: neither a JSON file nor JSON lines ({error.msg})") from None
    return documents


def coco_annotation_boxes(documents: list[tuple[int, object]], path: Path) -> dict[str, GivenBoxes]:
    """Group COCO annotations by image. Keys are image file stems when the file lists ``images``,
    else the numeric ``image_id`` as a string (matched to files named by number, e.g. 000000039769)."""
    annotations: list[tuple[int, dict]] = []
    file_stems: dict[int, tuple[str, int | None, int | None]] = {}
    category_names: dict[int, str] = {}
    for line, document in documents:
        if isinstance(document, dict) and "annotations" in document:
            annotations += [(line, a) for a in document["annotations"]]
            for image in document.get("images", []):
                stem = Path(image["file_name"]).with_suffix("").as_posix()
                file_stems[int(image["id"])] = (stem, image.get("width"), image.get("height"))
            category_names.update({int(c["id"]): str(c["name"]) for c in document.get("categories", [])})
        elif isinstance(document, dict):
            annotations.append((line, document))
        elif isinstance(document, list):
            annotations += [(line, a) for a in document]
        else:
            raise ValueError(f"{path}:{line}: expected COCO annotations (objects with 'bbox'), got {type(document).__name__}")

    grouped: dict[str, list[tuple[list[float], str]]] = {}
    sizes: dict[str, tuple[int | None, int | None]] = {}
    for line, annotation in annotations:
        if not isinstance(annotation, dict) or "bbox" not in annotation or "image_id" not in annotation:
            raise ValueError(f"{path}:{line}: a COCO annotation needs 'image_id' and 'bbox': {str(annotation)[:120]}")
        x, y, w, h = (float(v) for v in annotation["bbox"])
        if w <= 0 or h <= 0:
            raise ValueError(
                f"{path}:{line}: annotation {annotation.get('id')} of image {annotation['image_id']} has an "
                f"empty bbox {annotation['bbox']}"
            )
        image_id = int(annotation["image_id"])
        key, width, height = file_stems.get(image_id, (str(image_id), None, None))
        category = annotation.get("category_id")
        name = category_names.get(category, str(category)) if category is not None else ""
        grouped.setdefault(key, []).append(([x, y, x + w, y + h], name))
        sizes[key] = (width, height)

    return {
        key: GivenBoxes(
            boxes=np.asarray([b for b, _ in rows], dtype=np.float32).reshape(-1, 4),
            scores=np.ones(len(rows), dtype=np.float32),
            names=[n for _, n in rows],
            width=sizes[key][0],
            height=sizes[key][1],
            source=str(path),
        )
        for key, rows in grouped.items()
    }


def vcr_metadata_boxes(metadata: dict, source: str) -> GivenBoxes:
    for field in ("boxes", "width", "height"):
        if field not in metadata:
            raise ValueError(f"{source}: VCR metadata without '{field}'")
    rows = np.asarray(metadata["boxes"], dtype=np.float32).reshape(len(metadata["boxes"]), -1)
    if len(rows) and rows.shape[1] not in (4, 5):
        raise ValueError(f"{source}: VCR boxes must be rows of x1, y1, x2, y2[, score]; got {rows.shape[1]} values")
    boxes = rows[:, :4].reshape(-1, 4)
    bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if len(bad):
        raise ValueError(f"{source}: box {int(bad[0])} is empty: {boxes[bad[0]].tolist()}")
    scores = rows[:, 4] if rows.shape[1] == 5 else np.ones(len(rows), dtype=np.float32)
    names = [str(n) for n in metadata.get("names", [])]
    return GivenBoxes(boxes, scores.astype(np.float32), names, int(metadata["width"]), int(metadata["height"]), source)


def read_vcr_metadata_folder(folder: Path) -> dict[str, GivenBoxes]:
    """Keys are paths relative to ``folder`` without ``.json`` — VCR's ``img_fn`` minus ``.jpg``."""
    files = sorted(folder.rglob("*.json"))
    if not files:
        raise ValueError(f"--boxes: {folder} holds no .json metadata files")
    given = {}
    for file in files:
        try:
            metadata = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}:{error.lineno}: invalid JSON ({error.msg})") from None
        given[file.relative_to(folder).with_suffix("").as_posix()] = vcr_metadata_boxes(metadata, str(file))
    return given


def _match_keys(image_id: str) -> list[str]:
    """An image id's possible names in a box file: itself, its file stem, its number."""
    stem = image_id.rsplit("/", 1)[-1]
    keys = [image_id, stem]
    if stem.isdigit():
        keys.append(str(int(stem)))
    return keys


def match_given_boxes(
    image_ids: list[str], given: dict[str, GivenBoxes]
) -> tuple[dict[str, GivenBoxes], list[str], list[str]]:
    """Pair images with their boxes: ``(boxes by image id, image ids without boxes, box keys
    without an image)``. Both leftovers go into the report; none is dropped silently."""
    matched: dict[str, GivenBoxes] = {}
    used: set[str] = set()
    for image_id in image_ids:
        key = next((k for k in _match_keys(image_id) if k in given), None)
        if key is not None:
            matched[image_id] = given[key]
            used.add(key)
    without_boxes = [i for i in image_ids if i not in matched]
    without_image = sorted(set(given) - used)
    return matched, without_boxes, without_image
