"""Write the generated benchmark: pictures, simulated detector output, captions, VCR, GLUE, README.

Everything is a function of the settings: each image draws from its own random stream seeded by
(seed, purpose, image id), so the bytes do not depend on the number of worker processes and the
same seed always gives the same files.
"""

from __future__ import annotations

import base64
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from interbert.synthetic.baseline import bag_of_words_retrieval
from interbert.synthetic.detector import AttributeCodes, Detections, max_proposals, simulate_detections
from interbert.synthetic.language import LANGUAGES, Caption, label_words, scene_captions, twin_captions
from interbert.synthetic.render import scene_png
from interbert.synthetic.scenes import KINDS, Scene, make_twin, sample_scene
from interbert.synthetic.tasks import caption_pairs, vcr_item, vcr_metadata

FORMATS = ("tsv", "npz", "store")
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
            raise ValueError(f"num_classes must be at least {len(KINDS) + 1} (background + kinds), got {self.num_classes}")
        if self.image_width < 64 or self.image_height < 48:
            raise ValueError(f"images must be at least 64x48 pixels, got {self.image_width}x{self.image_height}")
        self.split_sizes()


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
def build_examples(settings: SynthSettings) -> list[Example]:
    """Scenes with their captions: train and val scenes, then the test split as consecutive twin
    pairs (alternately colour- and position-swapped)."""
    sizes = settings.split_sizes()
    w, h, lang, seed = settings.image_width, settings.image_height, settings.lang, settings.seed
    examples: list[Example] = []
    for split in ("train", "val"):
        for _ in range(sizes[split]):
            image_id = len(examples)
            scene = sample_scene(image_id, _rng(seed, _SCENES, image_id), w, h)
            examples.append(Example(scene, split, scene_captions(scene, _rng(seed, _CAPTIONS, image_id), lang)))
    for pair in range(sizes["test"] // 2):
        first_id = len(examples)
        rng = _rng(seed, _TWINS, first_id)
        mode = ("colour", "position")[pair % 2]
        while True:  # some scenes admit no such twin (e.g. every object the same colour): draw again
            twins = make_twin(sample_scene(first_id, rng, w, h), first_id + 1, mode, rng)
            if twins is None:
                continue
            captions = twin_captions(*twins, rng, lang)
            if captions is not None:
                break
        examples.append(Example(twins[0], "test", captions[0]))
        examples.append(Example(twins[1], "test", captions[1]))
    return examples


# --------------------------------------------------------------------------------------------------
# Region features and pictures (the heavy part, run in worker processes)
# --------------------------------------------------------------------------------------------------
def _b64(array: np.ndarray) -> bytes:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes())


def tsv_line(scene: Scene, detections: Detections) -> bytes:
    """One bottom-up-attention TSV row: image_id, image_w, image_h, num_boxes, then base64 float32
    boxes (N x 4, x1 y1 x2 y2 pixels), features (N x D) and cls_prob (N x C)."""
    head = f"{scene.image_id}\t{scene.width}\t{scene.height}\t{len(detections.boxes)}\t".encode()
    return head + b"\t".join([_b64(detections.boxes), _b64(detections.features), _b64(detections.class_probs)]) + b"\n"


_CODES: dict[tuple[int, int], AttributeCodes] = {}


def _regions_for(scenes: list[Scene], settings: SynthSettings, image_dir: str | None) -> list[bytes]:
    key = (settings.seed, settings.feature_dim)
    if key not in _CODES:
        _CODES[key] = AttributeCodes.from_seed(*key)
    lines = []
    for scene in scenes:
        detections = simulate_detections(scene, _CODES[key], settings.num_classes, _rng(settings.seed, _DETECTOR, scene.image_id))
        lines.append(tsv_line(scene, detections))
        if image_dir is not None:
            Path(image_dir, f"{scene.image_id}.png").write_bytes(scene_png(scene))
    return lines


def write_regions(examples: list[Example], settings: SynthSettings, out: Path, workers: int, chunk: int = 50) -> Path:
    """Simulated detections of every image as one bottom-up TSV (and the PNGs, when rendered)."""
    path = out / "regions.tsv"
    image_dir = str(out / "images") if settings.render_images else None
    chunks = [[e.scene for e in examples[k:k + chunk]] for k in range(0, len(examples), chunk)]
    with open(path, "wb") as f:
        if workers <= 1:
            for scenes in chunks:
                f.writelines(_regions_for(scenes, settings, image_dir))
            return path
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
            # A bounded window of chunks in flight keeps memory flat however many images there are.
            pending = []
            for scenes in chunks:
                pending.append(pool.submit(_regions_for, scenes, settings, image_dir))
                if len(pending) >= 2 * workers:
                    f.writelines(pending.pop(0).result())
            for future in pending:
                f.writelines(future.result())
    return path


# --------------------------------------------------------------------------------------------------
# Text files
# --------------------------------------------------------------------------------------------------
def karpathy_json(examples: list[Example]) -> dict:
    images, sentid = [], 0
    for e in examples:
        sentences = []
        for c in e.captions:
            sentences.append({"tokens": c.tokens, "raw": c.raw, "imgid": e.scene.image_id, "sentid": sentid})
            sentid += 1
        entry = {
            "filename": f"{e.scene.image_id}.png",
            "imgid": e.scene.image_id,
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


def write_vcr(examples: list[Example], settings: SynthSettings, out: Path) -> dict[str, str]:
    """VCR layout: questions per split in vcr/<split>.jsonl; metadata JSONs beside the pictures
    (images/<id>.json), as VCR keeps them beside its frames; img_fn/metadata_fn are relative to images/."""
    (out / "vcr").mkdir(exist_ok=True)
    files = {}
    for split in ("train", "val"):
        lines = []
        for e in examples:
            if e.split != split:
                continue
            image_id = e.scene.image_id
            rng = _rng(settings.seed, _VCR, image_id)
            metadata = vcr_metadata(e.scene, rng)
            (out / "images" / f"{image_id}.json").write_text(json.dumps(metadata))
            item = vcr_item(e.scene, rng, f"{split}-{image_id}", f"{image_id}.png", f"{image_id}.json")
            lines.append(json.dumps(item, ensure_ascii=False))
        (out / "vcr" / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        files[split] = f"vcr/{split}.jsonl"
    return files


def write_glue(examples: list[Example], settings: SynthSettings, out: Path) -> dict[str, object]:
    """MRPC layout (Quality, #1 ID, #2 ID, #1 String, #2 String): Quality 1 when both captions are
    true of the scene the first was written for, 0 when the second is false of it."""
    (out / "glue").mkdir(exist_ok=True)
    # Sentence ids are the Karpathy sentids; a caption written for a twin made only for a pair gets
    # a fresh id after them. (Keyed by object identity: the examples' captions live throughout.)
    sentence_id = {id(c): k for k, c in enumerate(c for e in examples for c in e.captions)}
    next_id = len(sentence_id)
    files, positives = {}, {}
    for split, name in (("train", "train"), ("val", "dev")):
        pool = [(e.scene, c) for e in examples if e.split == split for c in e.captions]
        rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        labels = []
        for e in examples:
            if e.split != split:
                continue
            for label, first, second in caption_pairs(e.scene, e.captions, pool, _rng(settings.seed, _GLUE, e.scene.image_id), settings.lang):
                second_id = sentence_id.get(id(second))
                if second_id is None:
                    second_id, next_id = next_id, next_id + 1
                rows.append(f"{label}\t{sentence_id[id(first)]}\t{second_id}\t{first.raw}\t{second.raw}")
                labels.append(label)
        (out / "glue" / f"{name}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        files[name] = f"glue/{name}.tsv"
        positives[name] = float(np.mean(labels))
    return {"files": files, "positive_rate": positives}


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
) -> dict:
    """Generate the benchmark into `out_dir` and return its manifest (also written to synth.json).

    The detector is simulated (see :mod:`interbert.synthetic.detector`): its features encode the
    objects' attributes by construction. `workers` only changes the speed, never the bytes.
    """
    settings = SynthSettings(images, lang, seed, fmt, feature_dim, num_classes, val_images, test_images,
                             image_width, image_height, render_images)
    settings.validate()
    if fmt != "tsv":
        raise NotImplementedError(
            f"--format {fmt} needs the feature-store writers of interbert.data, which this checkout "
            "does not have yet; use --format tsv (the bottom-up TSV every reader accepts)"
        )
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)

    examples = build_examples(settings)
    regions = write_regions(examples, settings, out, workers)
    (out / "captions.json").write_text(json.dumps(karpathy_json(examples), ensure_ascii=False), encoding="utf-8")
    (out / "scenes.jsonl").write_text("".join(json.dumps(scene_record(e)) + "\n" for e in examples))
    vcr_files = write_vcr(examples, settings, out)
    glue = write_glue(examples, settings, out)
    baseline = retrieval_baseline(examples, lang)

    sizes = settings.split_sizes()
    manifest = {
        "dataset": "synth",
        "generator": "interbert.synthetic",
        "settings": asdict(settings),
        "splits": sizes | {"test_twin_pairs": sizes["test"] // 2},
        "files": {
            "captions": "captions.json",
            "regions": regions.name,
            "regions_format": fmt,
            "regions_fields": list(TSV_FIELDS),
            "images": "images",
            "scenes": "scenes.jsonl",
            "vcr": vcr_files | {"images_root": "images"},
            "glue": glue["files"],
            "readme": "README.md",
        },
        "detector": {
            "simulated": True,
            "classes": ["__background__", *KINDS],
            "num_classes": num_classes,
            "feature_dim": feature_dim,
            "max_boxes": max_proposals(),
        },
        "baseline_bag_of_words": baseline,
        "glue_positive_rate": glue["positive_rate"],
    }
    manifest["bytes"] = _sizes(out)
    (out / "README.md").write_text(readme(manifest), encoding="utf-8")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _sizes(out: Path) -> dict[str, int]:
    sizes = {name: (out / name).stat().st_size for name in ("regions.tsv", "captions.json", "scenes.jsonl")}
    sizes["images/"] = sum(p.stat().st_size for p in (out / "images").iterdir())
    return sizes


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def readme(manifest: dict) -> str:
    s, splits, b = manifest["settings"], manifest["splits"], manifest["baseline_bag_of_words"]
    det = manifest["detector"]
    megabytes = {k: f"{v / 1e6:.1f} MB" for k, v in manifest["bytes"].items()}
    return f"""# Generated benchmark (interbert data synth)

Generated by `interbert.synthetic` with seed {s['seed']}: {s['images']} scenes of 2-5 coloured objects
(kind, colour, size, position; some overlap), captions in `{s['lang']}`. The same settings always
give the same bytes. Nothing here is a real photograph or a real detector's output.

| split | images | notes |
|---|---|---|
| train | {splits['train']} | |
| val | {splits['val']} | |
| test | {splits['test']} | {splits['test_twin_pairs']} twin pairs: two scenes that differ only by swapping two objects' colours (or positions) |

## Files
- `synth.json`: the settings, split sizes and paths (what downstream code reads).
- `images/<id>.png`: the pictures ({s['image_width']}x{s['image_height']}){'' if s['render_images'] else ' — not rendered for this run (--no-images)'}; `images/<id>.json`: VCR metadata of train/val scenes.
- `regions.tsv`: **simulated** detector output, bottom-up-attention TSV, no header, one image per line:
  `image_id, image_w, image_h, num_boxes, boxes, features, cls_prob` (base64 float32; boxes
  x1 y1 x2 y2 in pixels; features {det['feature_dim']}-d; cls_prob over {det['num_classes']} classes,
  class 0 = background, classes 1-{len(det['classes']) - 1} = {', '.join(det['classes'][1:])}; the rest are unused).
  At most {det['max_boxes']} boxes per image: 3-4 jittered proposals per object (IoU >= 0.5 with each
  other) and 2-3 background proposals (IoU < 0.3 with everything). A proposal's feature is a fixed
  random code of its object's kind + colour + size, weighted by how well the box fits, plus noise: a
  masked proposal can be read off its neighbours unless its whole IoU group is masked.
- `captions.json`: Karpathy layout (`images[].filename, imgid, split, sentences[].raw/tokens, sentids`,
  `dataset: "synth"`), 5 captions per image; test twins also carry `twin_of`.
- `scenes.jsonl`: the ground truth of every scene (objects, boxes, twins).
- `vcr/train.jsonl`, `vcr/val.jsonl`: VCR layout, one question per scene ("What colour is [1] ?",
  "Where is [0] compared to [2] ?"), 4 answers and 4 rationales; `img_fn`/`metadata_fn` relative to `images/`.
- `glue/train.tsv`, `glue/dev.tsv`: MRPC layout; Quality 1 = both captions are true of the scene
  the first was written for, 0 = the second is false of it (half the negatives are the caption of
  a colour-swapped twin: the same words, bound differently).

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
