"""Write the generated benchmark: pictures, simulated detector output, captions, VCR, GLUE, README.

Everything is a function of the settings: each image draws from its own random stream seeded by
(seed, purpose, image id), so the bytes do not depend on the number of worker processes and the
same seed always gives the same files.

Issue 28's knobs (how much overlapping proposals leak, how many training images have a twin) are
settings too, recorded in ``synth.json``; at their defaults the files are byte for byte those written
before the knobs existed (tests/synthetic/test_synthetic_defaults.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from interbert.data.features import Regions, RegionStoreWriter, write_npz_folder
from interbert.synthetic.baseline import bag_of_words_retrieval
from interbert.synthetic.detector import (
    FEATURE_NOISE,
    MIN_GROUP_IOU,
    PROPOSALS_PER_OBJECT,
    AttributeCodes,
    Detections,
    DetectorKnobs,
    max_proposals,
    simulate_detections,
)
from interbert.synthetic.language import LANGUAGES, Caption, label_words, scene_captions, twin_captions
from interbert.synthetic.render import scene_png
from interbert.synthetic.scenes import KINDS, Scene, make_twin, sample_scene
from interbert.synthetic.tasks import caption_pairs, vcr_item, vcr_metadata

FORMATS = ("tsv", "npz", "store")
REGION_LAYOUTS = {
    "tsv": "bottom-up-attention TSV, no header, one image per line: `image_id, image_w, image_h, "
           "num_boxes, boxes, features, cls_prob` (base64 float32)",
    "npz": "one `<image_id>.npz` per image with `features`, `boxes`, `image_w`, `image_h`, `class_probs`",
    "store": "interbert's region store (memory-mapped chunks; open with `interbert.data.open_features`)",
}
TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob")
MANIFEST = "synth.json"
# Purposes of the per-image random streams (the second seed word).
_SCENES, _CAPTIONS, _DETECTOR, _VCR, _GLUE, _TWINS = range(1, 7)


@dataclass(frozen=True)
class SynthSettings:
    images: int = 1000
    lang: str = "en"
    seed: int = 0
    fmt: str = "tsv"
    feature_dim: int = 2048
    num_classes: int = 1601
    val_images: int | None = None
    test_images: int | None = None
    image_width: int = 128
    image_height: int = 96
    render_images: bool = True
    # issue 28's knobs (see detector.DetectorKnobs and train_twin_starts)
    proposals_per_object: tuple[int, int] = PROPOSALS_PER_OBJECT
    group_iou: float = MIN_GROUP_IOU
    feature_noise: float = FEATURE_NOISE
    twin_share: float = 0.0  # of the train images, the share that come as twin pairs (test: always all)

    @property
    def detector_knobs(self) -> DetectorKnobs:
        return DetectorKnobs(tuple(self.proposals_per_object), self.group_iou, self.feature_noise)

    def split_sizes(self) -> dict[str, int]:
        """Train/val/test sizes; by default 10% each for val and test (test rounded to whole twin pairs)."""
        val = self.val_images if self.val_images is not None else max(1, self.images // 10)
        test = self.test_images if self.test_images is not None else max(2, self.images // 10)
        test -= test % 2
        train = self.images - val - test
        if train < 1 or val < 1 or test < 2:
            raise ValueError(
                f"cannot split {self.images} images into train/val/test with val={val}, test={test} "
                "(test needs at least one twin pair, train and val at least one image)"
            )
        return {"train": train, "val": val, "test": test}

    def validate(self) -> None:
        if self.lang not in LANGUAGES:
            raise ValueError(f"unknown language {self.lang!r}; expected one of {LANGUAGES}")
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown feature format {self.fmt!r}; expected one of {FORMATS}")
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {self.feature_dim}")
        if self.num_classes < len(KINDS) + 1:
            raise ValueError(
                f"num_classes must be at least {len(KINDS) + 1} (background + kinds), got {self.num_classes}"
            )
        if self.image_width < 64 or self.image_height < 48:
            raise ValueError(f"images must be at least 64x48 pixels, got {self.image_width}x{self.image_height}")
        self.detector_knobs.validate()
        if not (math.isfinite(self.twin_share) and 0.0 <= self.twin_share <= 1.0):
            raise ValueError(f"--twin-share must be a share of the train images in [0, 1], got {self.twin_share}")
        self.split_sizes()


KNOBS = ("proposals_per_object", "group_iou", "feature_noise", "twin_share")


def tuple_or_value(value):
    """Lists (from synth.json) and tuples compare alike."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class Example:
    scene: Scene
    split: str
    captions: list[Caption]


def _rng(seed: int, purpose: int, image_id: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, image_id])


# --------------------------------------------------------------------------------------------------
# Scenes and captions
# --------------------------------------------------------------------------------------------------
def plain_example(image_id: int, split: str, settings: SynthSettings) -> Example:
    seed = settings.seed
    scene = sample_scene(image_id, _rng(seed, _SCENES, image_id), settings.image_width, settings.image_height)
    return Example(scene, split, scene_captions(scene, _rng(seed, _CAPTIONS, image_id), settings.lang))


def twin_examples(first_id: int, pair_number: int, settings: SynthSettings,
                  split: str = "test") -> tuple[Example, Example]:
    """Images `first_id` and `first_id + 1`: twins, alternately colour- and position-swapped."""
    rng = _rng(settings.seed, _TWINS, first_id)
    mode = ("colour", "position")[pair_number % 2]
    while True:  # some scenes admit no such twin (e.g. every object the same colour): draw again
        scene = sample_scene(first_id, rng, settings.image_width, settings.image_height)
        twins = make_twin(scene, first_id + 1, mode, rng)
        if twins is None:
            continue
        captions = twin_captions(*twins, rng, settings.lang)
        if captions is not None:
            return Example(twins[0], split, captions[0]), Example(twins[1], split, captions[1])


def train_twin_number(image_id: int, settings: SynthSettings, train: int) -> int | None:
    """Whether train image `image_id` starts a twin pair (with `image_id + 1`), and if so which one
    (0, 1, ...; even pairs swap colours, odd ones positions, as in test). The train images are seen as
    slots of two; ``twin_share`` of the slots are pairs, spread evenly (slot p is one when
    floor((p + 1) * share) > floor(p * share)), so the share is exact and the same at every size."""
    slot, share = image_id // 2, settings.twin_share
    if share == 0 or image_id % 2 or image_id + 1 >= train:
        return None
    before = math.floor(slot * share)
    return before if math.floor((slot + 1) * share) > before else None


def train_twin_pairs(settings: SynthSettings) -> int:
    return math.floor(settings.split_sizes()["train"] // 2 * settings.twin_share)


def split_of(image_id: int, sizes: dict[str, int]) -> str:
    if image_id < sizes["train"]:
        return "train"
    return "val" if image_id < sizes["train"] + sizes["val"] else "test"


# --------------------------------------------------------------------------------------------------
# One chunk of images, end to end (run in worker processes)
# --------------------------------------------------------------------------------------------------
def _b64(array: np.ndarray) -> bytes:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes())


def tsv_line(scene: Scene, detections: Detections) -> bytes:
    """One bottom-up-attention TSV row: image_id, image_w, image_h, num_boxes, then base64 float32
    boxes (N x 4, x1 y1 x2 y2 pixels), features (N x D) and cls_prob (N x C)."""
    head = f"{scene.image_id}\t{scene.width}\t{scene.height}\t{len(detections.boxes)}\t".encode()
    return head + b"\t".join([_b64(detections.boxes), _b64(detections.features), _b64(detections.class_probs)]) + b"\n"


@dataclass
class ChunkResult:
    examples: list[Example]
    regions: list  # TSV lines (tsv), (id, Regions) pairs (store) or nothing (npz: written by the worker)
    vcr_lines: dict[str, list[str]]
    glue_rows: dict[str, list[tuple[int, str]]]  # split -> (label, row)


_CODES: dict[tuple[int, int], AttributeCodes] = {}


def build_chunk(first_id: int, stop_id: int, settings: SynthSettings, out: str) -> ChunkResult:
    """Images first_id..stop_id-1: scenes, captions, pictures, detections, VCR items, GLUE pairs.
    Chunk borders never split a twin pair (test pairs start at even offsets, chunks are even)."""
    sizes = settings.split_sizes()
    test_start = sizes["train"] + sizes["val"]
    examples: list[Example] = []
    image_id = first_id
    while image_id < stop_id:
        twin_number = train_twin_number(image_id, settings, sizes["train"])
        if twin_number is not None:  # chunks start at even ids in train, so a pair never straddles two
            examples.extend(twin_examples(image_id, twin_number, settings, split="train"))
            image_id += 2
        elif image_id < test_start:
            examples.append(plain_example(image_id, split_of(image_id, sizes), settings))
            image_id += 1
        else:
            examples.extend(twin_examples(image_id, (image_id - test_start) // 2, settings))
            image_id += 2

    key = (settings.seed, settings.feature_dim)
    if key not in _CODES:
        _CODES[key] = AttributeCodes.from_seed(*key)
    result = ChunkResult(examples, [], {"train": [], "val": []}, {"train": [], "dev": []})
    out_path = Path(out)
    # Keyed by object identity: the chunk's captions live as long as this call.
    sentence_ids = {id(c): 5 * e.scene.image_id + k for e in examples for k, c in enumerate(e.captions)}
    captions_by_split = {split: [(e.scene, c) for e in examples if e.split == split for c in e.captions]
                         for split in ("train", "val")}
    for e in examples:
        scene = e.scene
        rng = _rng(settings.seed, _DETECTOR, scene.image_id)
        detections = simulate_detections(scene, _CODES[key], settings.num_classes, rng, settings.detector_knobs)
        if settings.fmt == "tsv":
            result.regions.append(tsv_line(scene, detections))
        else:
            regions = Regions(detections.features, detections.boxes, scene.width, scene.height, detections.class_probs)
            if settings.fmt == "npz":
                write_npz_folder(out_path / "regions", [(str(scene.image_id), regions)])
            else:
                result.regions.append((str(scene.image_id), regions))
        if settings.render_images:
            (out_path / "images" / f"{scene.image_id}.png").write_bytes(scene_png(scene))
        if e.split in ("train", "val"):
            result.vcr_lines[e.split].append(_vcr_line(e, settings, out_path))
            glue_split = "train" if e.split == "train" else "dev"
            result.glue_rows[glue_split].extend(_glue_rows(e, sentence_ids, captions_by_split[e.split], settings))
    return result


def _vcr_line(e: Example, settings: SynthSettings, out: Path) -> str:
    """VCR layout: the metadata JSON lies beside the picture (images/<id>.json), as VCR keeps it
    beside its frames; img_fn and metadata_fn are relative to images/."""
    image_id = e.scene.image_id
    rng = _rng(settings.seed, _VCR, image_id)
    metadata = vcr_metadata(e.scene, rng)
    (out / "images" / f"{image_id}.json").write_text(json.dumps(metadata))
    item = vcr_item(e.scene, rng, f"{e.split}-{image_id}", f"{image_id}.png", f"{image_id}.json")
    return json.dumps(item, ensure_ascii=False)


def _glue_rows(e: Example, sentence_ids: dict[int, int], others: list[tuple[Scene, Caption]],
               settings: SynthSettings) -> list[tuple[int, str]]:
    """MRPC rows. Sentence ids are the Karpathy sentids (5 per image, in order); a caption written
    for a twin made only for this pair gets id 5 * images + image_id."""
    image_id = e.scene.image_id
    others = [(scene, c) for scene, c in others if scene is not e.scene]
    rows = []
    rng = _rng(settings.seed, _GLUE, image_id)
    for label, first, second in caption_pairs(e.scene, e.captions, others, rng, settings.lang):
        second_id = sentence_ids.get(id(second), 5 * settings.images + image_id)
        rows.append((label, f"{label}\t{sentence_ids[id(first)]}\t{second_id}\t{first.raw}\t{second.raw}"))
    return rows


def chunk_bounds(settings: SynthSettings, chunk: int = 50) -> list[tuple[int, int]]:
    """Fixed chunks (independent of the number of workers), never splitting a twin pair."""
    sizes = settings.split_sizes()
    test_start = sizes["train"] + sizes["val"]
    bounds, start = [], 0
    while start < settings.images:
        stop = min(start + chunk, settings.images)
        if stop > test_start and (stop - test_start) % 2:
            stop += 1
        bounds.append((start, stop))
        start = stop
    return bounds


def run_chunks(settings: SynthSettings, out: Path, workers: int):
    """Yield the chunks' results in order, computed by `workers` processes (a bounded window of
    chunks in flight keeps memory flat however many images there are)."""
    bounds = chunk_bounds(settings)
    if workers <= 1:
        for start, stop in bounds:
            yield build_chunk(start, stop, settings, str(out))
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
        pending = []
        for start, stop in bounds:
            pending.append(pool.submit(build_chunk, start, stop, settings, str(out)))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


# --------------------------------------------------------------------------------------------------
# Text files
# --------------------------------------------------------------------------------------------------
def karpathy_json(examples: list[Example]) -> dict:
    images = []
    for e in examples:
        image_id = e.scene.image_id
        sentences = [{"tokens": c.tokens, "raw": c.raw, "imgid": image_id, "sentid": 5 * image_id + k}
                     for k, c in enumerate(e.captions)]
        entry = {
            "filename": f"{image_id}.png",
            "imgid": image_id,
            "split": e.split,
            "sentences": sentences,
            "sentids": [s["sentid"] for s in sentences],
        }
        if e.scene.twin_of is not None:
            entry["twin_of"] = e.scene.twin_of
        images.append(entry)
    return {"images": images, "dataset": "synth"}


def scene_record(e: Example) -> dict:
    s = e.scene
    return {
        "image_id": s.image_id, "split": e.split, "width": s.width, "height": s.height,
        "objects": [{"kind": o.kind, "colour": o.colour, "size": o.size, "box": [round(v, 3) for v in o.box]}
                    for o in s.objects],
        "twin_of": s.twin_of, "twin_mode": s.twin_mode, "twin_pair": list(s.twin_pair) if s.twin_pair else None,
    }


def retrieval_baseline(examples: list[Example], lang: str) -> dict[str, float]:
    test = [e for e in examples if e.split == "test"]
    position = {e.scene.image_id: k for k, e in enumerate(test)}
    tokens, owners = [], []
    for k, e in enumerate(test):
        for c in e.captions:
            tokens.append(c.tokens)
            owners.append(k)
    twin_of = [position.get(e.scene.twin_of) if e.scene.twin_of is not None else None for e in test]
    return bag_of_words_retrieval(tokens, owners, [label_words(e.scene, lang) for e in test], twin_of)


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------
def generate(
    out_dir: str | os.PathLike,
    images: int = 1000,
    lang: str = "en",
    seed: int = 0,
    fmt: str = "tsv",
    feature_dim: int = 2048,
    num_classes: int = 1601,
    val_images: int | None = None,
    test_images: int | None = None,
    image_width: int = 128,
    image_height: int = 96,
    render_images: bool = True,
    workers: int | None = None,
    proposals_per_object: tuple[int, int] = PROPOSALS_PER_OBJECT,
    group_iou: float = MIN_GROUP_IOU,
    feature_noise: float = FEATURE_NOISE,
    twin_share: float = 0.0,
) -> dict:
    """Generate the benchmark into `out_dir` and return its manifest (also written to synth.json).

    The detector is simulated (see :mod:`interbert.synthetic.detector`): its features encode the
    objects' attributes by construction. `workers` only changes the speed, never the bytes; the last four
    are issue 28's knobs (:class:`SynthSettings`)."""
    settings = SynthSettings(images, lang, seed, fmt, feature_dim, num_classes, val_images, test_images,
                             image_width, image_height, render_images, tuple(proposals_per_object), group_iou,
                             feature_noise, twin_share)
    settings.validate()
    out = Path(out_dir)
    _clear_previous_benchmark(out)
    for folder in ("images", "vcr", "glue"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)

    examples: list[Example] = []
    vcr_lines: dict[str, list[str]] = {"train": [], "val": []}
    glue_rows: dict[str, list[tuple[int, str]]] = {"train": [], "dev": []}
    regions_path = out / ("regions.tsv" if fmt == "tsv" else "regions")
    store = RegionStoreWriter(regions_path, chunk_size=1000) if fmt == "store" else None
    with open(regions_path, "wb") if fmt == "tsv" else contextlib.nullcontext() as tsv:
        for chunk in run_chunks(settings, out, workers):
            examples.extend(chunk.examples)
            for split in vcr_lines:
                vcr_lines[split].extend(chunk.vcr_lines[split])
            for split in glue_rows:
                glue_rows[split].extend(chunk.glue_rows[split])
            if tsv is not None:
                tsv.writelines(chunk.regions)
            elif store is not None:
                for image_id, regions in chunk.regions:
                    store.add(image_id, regions)
    if store is not None:
        store.close()

    glue_positive_rate = write_text_files(out, examples, vcr_lines, glue_rows)
    manifest = build_manifest(settings, regions_path.name, retrieval_baseline(examples, lang), glue_positive_rate)
    manifest["bytes"] = _sizes(out, regions_path)
    (out / "README.md").write_text(readme(manifest), encoding="utf-8")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def write_text_files(out: Path, examples: list[Example], vcr_lines: dict[str, list[str]],
                     glue_rows: dict[str, list[tuple[int, str]]]) -> dict[str, float]:
    """captions.json, scenes.jsonl, the VCR and GLUE files; returns the GLUE splits' positive rates."""
    (out / "captions.json").write_text(json.dumps(karpathy_json(examples), ensure_ascii=False), encoding="utf-8")
    (out / "scenes.jsonl").write_text("".join(json.dumps(scene_record(e)) + "\n" for e in examples))
    for split, lines in vcr_lines.items():
        (out / "vcr" / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    for split, rows in glue_rows.items():
        (out / "glue" / f"{split}.tsv").write_text(header + "".join(row + "\n" for _, row in rows), encoding="utf-8")
    return {split: float(np.mean([label for label, _ in rows])) for split, rows in glue_rows.items()}


def build_manifest(settings: SynthSettings, regions_name: str, baseline: dict, glue_positive_rate: dict) -> dict:
    """synth.json's content (``bytes`` is added once the files are written)."""
    sizes = settings.split_sizes()
    return {
        "dataset": "synth",
        "generator": "interbert.synthetic",
        "settings": asdict(settings),
        "splits": sizes | {"test_twin_pairs": sizes["test"] // 2, "train_twin_pairs": train_twin_pairs(settings)},
        "files": {
            "captions": "captions.json",
            "regions": regions_name,
            "regions_format": settings.fmt,
            "regions_fields": list(TSV_FIELDS),
            "images": "images",
            "scenes": "scenes.jsonl",
            "vcr": {"train": "vcr/train.jsonl", "val": "vcr/val.jsonl", "images_root": "images"},
            "glue": {"train": "glue/train.tsv", "dev": "glue/dev.tsv"},
            "readme": "README.md",
        },
        "detector": {
            "simulated": True,
            "classes": ["__background__", *KINDS],
            "num_classes": settings.num_classes,
            "feature_dim": settings.feature_dim,
            "max_boxes": max_proposals(knobs=settings.detector_knobs),
        },
        "baseline_bag_of_words": baseline,
        "glue_positive_rate": glue_positive_rate,
    }


GENERATED_PATHS = ("images", "regions.tsv", "regions", "vcr", "glue", "captions.json", "scenes.jsonl", "README.md",
                   MANIFEST)


def _clear_previous_benchmark(out: Path) -> None:
    """Regenerating into a folder replaces the earlier benchmark entirely (no stale pictures or
    store chunks survive); a non-empty folder that is not a benchmark is refused, never emptied."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).exists():
        raise ValueError(f"{out} is not empty and holds no {MANIFEST}: choose an empty or new folder")
    for name in GENERATED_PATHS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _sizes(out: Path, regions: Path) -> dict[str, int]:
    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size

    return {name: size(out / name.rstrip("/")) for name in (regions.name + ("/" if regions.is_dir() else ""),
                                                             "captions.json", "scenes.jsonl", "images/")}


def _command(settings: dict) -> str:
    """The command line that regenerates these bytes."""
    flags = [f"--images {settings['images']}", f"--lang {settings['lang']}", f"--seed {settings['seed']}",
             f"--format {settings['fmt']}", f"--feature-dim {settings['feature_dim']}",
             f"--num-classes {settings['num_classes']}"]
    flags += [f"--{name.replace('_', '-')} {settings[name]}" for name in ("val_images", "test_images")
              if settings[name] is not None]
    flags += [] if settings["render_images"] else ["--no-images"]
    flags += [f"--{name.replace('_', '-')} {_span(value) if name == 'proposals_per_object' else value}"
              for name, value in _changed_knobs(settings).items()]
    return "interbert data synth OUT " + " ".join(flags)


def _changed_knobs(settings: dict) -> dict:
    """The knobs of a manifest's settings that are not at their defaults."""
    defaults = asdict(SynthSettings())
    return {name: settings[name] for name in KNOBS if tuple_or_value(settings[name]) != tuple_or_value(defaults[name])}


def _span(low_high) -> str:
    low, high = low_high
    return str(low) if low == high else f"{low}-{high}"


def _knob_note(settings: dict) -> str:
    """A sentence on the knobs set away from their defaults; nothing at the defaults (so that README is
    the one written before the knobs existed)."""
    if not _changed_knobs(settings):
        return ""
    return ("\nIssue 28's knobs are set here (`synth.json` records them): proposals per object "
            f"{_span(settings['proposals_per_object'])}, least IoU within an object's proposals {settings['group_iou']:g}, "
            f"feature noise {settings['feature_noise']:g}, share of train images in twin pairs {settings['twin_share']:g}.")


def _train_twins_note(splits: dict) -> str:
    pairs = splits["train_twin_pairs"]
    return f" {pairs} twin pairs, made as the test split's" if pairs else ""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def readme(manifest: dict) -> str:
    """The benchmark's README.md. Long: one template, read top to bottom as the file it writes."""
    s, splits, b = manifest["settings"], manifest["splits"], manifest["baseline_bag_of_words"]
    det = manifest["detector"]
    megabytes = {k: f"{v / 1e6:.1f} MB" for k, v in manifest["bytes"].items()}
    return f"""# Generated benchmark (interbert data synth)

Generated by `{_command(s)}`: {s['images']} scenes of 2-5 coloured objects
(kind, colour, size, position; some overlap), captions in `{s['lang']}`. The same settings always
give the same bytes. Nothing here is a real photograph or a real detector's output.{_knob_note(s)}

| split | images | notes |
|---|---|---|
| train | {splits['train']} |{_train_twins_note(splits)} |
| val | {splits['val']} | |
| test | {splits['test']} | {splits['test_twin_pairs']} twin pairs: two scenes that differ only by swapping two objects' colours (or positions) |

## Files
- `synth.json`: the settings, split sizes and paths (what downstream code reads).
- `images/<id>.png`: the pictures ({s['image_width']}x{s['image_height']}){'' if s['render_images'] else ' — not rendered for this run (--no-images)'}; `images/<id>.json`: VCR metadata of train/val scenes.
- `{manifest['files']['regions']}`: **simulated** detector output, {REGION_LAYOUTS[s['fmt']]}:
  boxes x1 y1 x2 y2 in pixels; features {det['feature_dim']}-d; cls_prob over {det['num_classes']} classes,
  class 0 = background, classes 1-{len(det['classes']) - 1} = {', '.join(det['classes'][1:])}; the rest are unused.
  At most {det['max_boxes']} boxes per image: {_span(s['proposals_per_object'])} jittered proposals per object (IoU >= {s['group_iou']:g} with each
  other) and 2-3 background proposals (IoU < 0.3 with everything). A proposal's feature is a fixed
  random code of its object's kind + colour + size, weighted by how well the box fits, plus noise: a
  masked proposal can be read off its neighbours unless its whole IoU group is masked.
- `captions.json`: Karpathy layout (`images[].filename, imgid, split, sentences[].raw/tokens, sentids`,
  `dataset: "synth"`), 5 captions per image; {'train and test' if splits['train_twin_pairs'] else 'test'} twins also carry `twin_of`.
- `scenes.jsonl`: the ground truth of every scene (objects, boxes, twins).
- `vcr/train.jsonl`, `vcr/val.jsonl`: VCR layout, one question per scene ("What colour is [1] ?",
  "Where is [0] compared to [2] ?"), 4 answers and 4 rationales, in English whatever the caption
  language; `img_fn`/`metadata_fn` relative to `images/`, `objects` = the detector class names.
- `glue/train.tsv`, `glue/dev.tsv`: MRPC layout; Quality 1 = both captions are true of the scene
  the first was written for, 0 = the second is false of it (a negative is the caption of a
  colour-swapped twin where one can be made: the same words, bound differently; else a caption of
  another scene checked to be false of this one).

Sizes: {', '.join(f'`{k}` {v}' for k, v in megabytes.items())}.

## Chance levels
- Image retrieval on test ({splits['test']} images): R@1 {_pct(1 / splits['test'])}, R@5 {_pct(min(1, 5 / splits['test']))}, R@10 {_pct(min(1, 10 / splits['test']))}.
- Twin choice (a caption against its own image and its twin): 50%.
- VCR: Q->A 25%, QA->R 25%, Q->AR 6.25%.
- GLUE pairs: majority class {_pct(max(manifest['glue_positive_rate']['dev'], 1 - manifest['glue_positive_rate']['dev']))} on dev.

## Text-only baseline (computed on this test split)
Bag of words: each image is the list of every word a perfect but unbound detector could name
(sizes, colours, kinds, synonyms, plurals); captions are matched by TF-IDF cosine; ties count against.

| metric | value |
|---|---|
| R@1 / R@5 / R@10 ({b['captions']} captions x {b['images']} images) | {_pct(b['R@1'])} / {_pct(b['R@5'])} / {_pct(b['R@10'])} |
| median rank | {b['median_rank']:.0f} |
| twin R@1 (own image vs its twin, ties against) | {_pct(b['twin_R@1'])} |
| twin R@1 with ties broken by a coin | {_pct(b['twin_R@1_coin'])} |
| twin ties | {_pct(b['twin_ties'])} |

A twin's caption and its twin's caption have the same bag of words, and both twins contain the
same words, so no bag-of-words model can beat 50% on twins; telling them apart needs binding words
to regions.
"""
