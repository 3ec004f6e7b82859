"""One extraction run: images -> detector -> the project's region store, restartable and shardable.

Layout of ``OUT`` (a :class:`interbert.data.features.RegionStore`, readable by ``open_features``)::

    OUT/manifest.json, chunk-*.npy ...   the store (unsharded runs, and merged shards)
    OUT/extract_meta.json                detector, weights hash, settings, random_weights
    OUT/extract_report.json              what happened to every image (decode failures by file name)
    OUT/features.tsv                     with --tsv: bottom-up-attention TSV (+ cls_prob column)
    OUT/shard-i-of-n/                    a sharded run's own store (and report, tsv)

Restart: ids already in the store are skipped (the store writer renames complete chunks into place,
so an interrupted run loses at most the unflushed chunk). Shards write separate stores, so processes
never share a file; a later unsharded run over the same folders merges complete shard stores into
``OUT`` first and then extracts whatever is still missing.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from interbert.data.features import RegionStore, RegionStoreWriter, convert_features, write_tsv
from interbert.detection.detector import (
    DetectorConfig,
    RegionDetector,
    build_detector,
    default_device,
    image_tensor,
    versions,
    warn_random_weights,
)
from interbert.detection.images import ImageDecodeError, decode_image
from interbert.extract.given_boxes import GivenBoxes, match_given_boxes, read_given_boxes
from interbert.extract.images import list_images, shard_from_environment, shard_ids
from interbert.utils.files import atomic_path, atomic_write_text, file_sha256

META_FILE = "extract_meta.json"
TSV_FILE = "features.tsv"
# Flush a chunk at least this often, so a crash on a slow (CPU) run loses minutes, not hours.
FLUSH_SECONDS = 300.0


@dataclass
class ExtractReport:
    images: str
    out: str
    shard: str  # "i/n"
    images_in_shard: int = 0
    extracted: int = 0
    already_done: int = 0
    merged_from_shards: int = 0
    failed: list[dict] = field(default_factory=list)  # {"image_id", "file", "error"}
    fewer_than_min_regions: list[str] = field(default_factory=list)
    images_without_boxes: list[str] = field(default_factory=list)  # --boxes: an image the file has no boxes for
    boxes_without_image: list[str] = field(default_factory=list)  # --boxes: keys with no image file
    ignored_files: list[str] = field(default_factory=list)  # files in IMAGES without an image suffix
    random_weights: bool = False
    seconds: float = 0.0
    report_path: str = ""

    @property
    def num_failed(self) -> int:
        return len(self.failed)

    def summary_line(self) -> str:
        parts = [
            f"extract {self.shard}: {self.images_in_shard} images",
            f"{self.extracted} extracted",
            f"{self.already_done} already done",
            f"{self.num_failed} failed to decode",
        ]
        if self.merged_from_shards:
            parts.append(f"{self.merged_from_shards} merged from shard stores")
        if self.images_without_boxes or self.boxes_without_image:
            parts.append(
                f"{len(self.images_without_boxes)} images without boxes, "
                f"{len(self.boxes_without_image)} box sets without an image"
            )
        if self.ignored_files:
            parts.append(f"{len(self.ignored_files)} non-image files ignored")
        line = ", ".join(parts) + f" in {self.seconds:.1f}s (report: {self.report_path})"
        return ("WARNING: " if self.failed else "") + line


class _ImageFiles(Dataset):
    """Decodes in DataLoader workers; a file that fails becomes an error record, not an exception,
    so one bad JPEG cannot stop a long run."""

    def __init__(self, items: list[tuple[str, Path]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image_id, path = self.items[index]
        try:
            pixels = decode_image(path)
        except ImageDecodeError as error:
            return {"image_id": image_id, "path": path, "error": str(error)}
        return {"image_id": image_id, "path": path, "image": image_tensor(pixels)}


def run_metadata(config: DetectorConfig, num_classes: int, feature_dim: int, boxes_file: str | Path | None) -> dict:
    """``settings`` must match on restart (mixing features of two detectors would be silent
    garbage); ``provenance`` is informational."""
    settings = {
        "detector": config.detector,
        "random_weights": config.random_weights,
        "weights_sha256": None if config.random_weights else file_sha256(config.weights),
        "seed": config.seed if config.random_weights else None,
        "num_classes": num_classes,
        "feature_dim": feature_dim,
        "min_size": config.min_size,
        "max_size": config.max_size,
        "given_boxes": boxes_file is not None,
        "min_regions": None if boxes_file else config.min_regions,
        "max_regions": None if boxes_file else config.max_regions,
        "score_threshold": None if boxes_file else config.score_threshold,
        "nms_threshold": None if boxes_file else config.nms_threshold,
    }
    provenance = {"weights": str(config.weights), "boxes_file": None if boxes_file is None else str(boxes_file), **versions()}
    return {"random_weights": config.random_weights, "settings": settings, "provenance": provenance}


def check_or_write_metadata(out: Path, metadata: dict) -> None:
    path = out / META_FILE
    if path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))["settings"]
        changed = {k: (earlier.get(k), v) for k, v in metadata["settings"].items() if earlier.get(k) != v}
        if changed:
            described = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in changed.items())
            raise ValueError(f"{out} was extracted with other settings ({described}); use a new OUT folder")
    atomic_write_text(path, json.dumps(metadata, indent=1) + "\n")


def merge_shard_stores(out: Path, progress: bool) -> int:
    """Copy complete shard stores (``OUT/shard-i-of-n``) into ``OUT``; ids already there are skipped."""
    merged = 0
    for shard_store in sorted(out.glob("shard-*-of-*")):
        if (shard_store / "manifest.json").exists():
            written, _ = convert_features(RegionStore(shard_store), out, progress=progress)
            merged += written
    return merged


def _images_of_shard(images: str | Path, boxes_file: str | Path | None, shard_index: int, shard_count: int,
                     report: ExtractReport) -> tuple[dict[str, Path], dict[str, GivenBoxes], list[str]]:
    """The image files under ``images`` (with their given boxes, when ``boxes_file`` lists them), and the ids this
    shard extracts; what is left out is recorded in ``report``."""
    files, others = list_images(images)
    report.ignored_files = [str(p) for p in others]
    given: dict[str, GivenBoxes] = {}
    if boxes_file is not None:
        given, report.images_without_boxes, report.boxes_without_image = match_given_boxes(
            list(files), read_given_boxes(boxes_file)
        )
        files = {image_id: files[image_id] for image_id in given}
    my_ids = shard_ids(list(files), shard_index, shard_count)
    report.images_in_shard = len(my_ids)
    return files, given, my_ids


def _extract_pending(detector: RegionDetector, loader: DataLoader, writer: RegionStoreWriter,
                     given: dict[str, GivenBoxes], config: DetectorConfig, report: ExtractReport, total: int,
                     progress: bool) -> None:
    """Run the detector over the loader's images and add each to ``writer`` (flushed every ``FLUSH_SECONDS``);
    an image that cannot be used is recorded in ``report.failed``, not dropped."""
    from tqdm.auto import tqdm

    last_flush = time.monotonic()
    with tqdm(total=total, desc="extract", unit="img", disable=not progress) as bar:
        for batch in loader:
            decoded = []
            for item in batch:
                problem = item.get("error") or _size_mismatch(item, given.get(item["image_id"]))
                if problem:
                    report.failed.append({"image_id": item["image_id"], "file": str(item["path"]), "error": problem})
                else:
                    decoded.append(item)
            for item, regions in zip(decoded, _run_detector(detector, decoded, given)):
                writer.add(item["image_id"], regions.as_regions())
                if not given and regions.num_boxes < config.min_regions:
                    report.fewer_than_min_regions.append(item["image_id"])
            report.extracted += len(decoded)
            bar.update(len(batch))
            if time.monotonic() - last_flush > FLUSH_SECONDS:
                writer.flush()
                last_flush = time.monotonic()


def _finish_report(report: ExtractReport, out: Path, shard_index: int, shard_count: int) -> ExtractReport:
    """Write the report as JSON beside the store (one per shard) and say on stderr what was done and what failed."""
    report_name = f"extract_report.shard-{shard_index}-of-{shard_count}.json" if shard_count > 1 else "extract_report.json"
    report.report_path = str(out / report_name)
    atomic_write_text(out / report_name, json.dumps({**asdict(report), "num_failed": report.num_failed}, indent=1) + "\n")
    print(report.summary_line(), file=sys.stderr, flush=True)
    for failure in report.failed:
        print(f"  could not use {failure['file']}: {failure['error']}", file=sys.stderr)
    return report


def extract_features(
    images: str | Path,
    out: str | Path,
    config: DetectorConfig,
    *,
    batch_size: int = 1,
    boxes_file: str | Path | None = None,
    tsv: bool = False,
    shard: tuple[int, int] | None = None,
    device: str | None = None,
    num_workers: int = 0,
    chunk_size: int = 500,
    progress: bool = True,
) -> ExtractReport:
    """Extract region features for every image under ``images`` into the store at ``out``.

    ``shard`` is ``(i, n)``; by default torchrun's ``RANK``/``WORLD_SIZE`` (``(0, 1)`` otherwise).
    Returns the report, which is also written as JSON next to the store.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    shard_index, shard_count = shard if shard is not None else shard_from_environment()
    sharded = shard_count > 1
    store_dir = out / f"shard-{shard_index}-of-{shard_count}" if sharded else out
    report = ExtractReport(images=str(images), out=str(out), shard=f"{shard_index}/{shard_count}")
    report.random_weights = config.random_weights

    files, given, my_ids = _images_of_shard(images, boxes_file, shard_index, shard_count, report)

    if config.random_weights:
        warn_random_weights()
    model, num_classes = build_detector(config)
    detector = RegionDetector(model, config, device or default_device())
    out.mkdir(parents=True, exist_ok=True)
    check_or_write_metadata(out, run_metadata(config, num_classes, detector.feature_dim, boxes_file))
    if not sharded:
        report.merged_from_shards = merge_shard_stores(out, progress)

    writer = RegionStoreWriter(store_dir, chunk_size=chunk_size)
    pending = [image_id for image_id in my_ids if image_id not in writer]
    report.already_done = len(my_ids) - len(pending)
    loader = DataLoader(
        _ImageFiles([(image_id, files[image_id]) for image_id in pending]),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
    )
    _extract_pending(detector, loader, writer, given, config, report, len(pending), progress)
    store = writer.close()
    if tsv:
        _write_tsv_atomically(store_dir / TSV_FILE, store)

    report.seconds = time.perf_counter() - started
    return _finish_report(report, out, shard_index, shard_count)


def _size_mismatch(item: dict, given: GivenBoxes | None) -> str | None:
    """Given boxes are in the pixels of the image their file describes; a differently sized image
    would get misplaced boxes."""
    if given is None or "image" not in item or given.width is None or given.height is None:
        return None
    height, width = item["image"].shape[-2:]
    if (width, height) != (given.width, given.height):
        return f"image is {width}x{height} but {given.source} gives boxes for {given.width}x{given.height}"
    return None


def _run_detector(detector: RegionDetector, decoded: list[dict], given: dict[str, GivenBoxes]):
    images = [item["image"] for item in decoded]
    if not given:
        return detector.detect(images)
    boxes = [given[item["image_id"]].boxes for item in decoded]
    scores = [given[item["image_id"]].scores for item in decoded]
    return detector.pool(images, boxes, scores)


def _write_tsv_atomically(path: Path, store: RegionStore) -> None:
    with atomic_path(path) as tmp:
        write_tsv(tmp, ((image_id, store[image_id]) for image_id in sorted(store.ids())), with_class_probs=True)

