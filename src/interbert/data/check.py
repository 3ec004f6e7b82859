"""``interbert data check``: can these captions (and VCR lines) and features train together?

The check reads every entry and every image once and reports every problem, not only the first: each
image that cannot be used, with its id and why; each malformed caption or VCR entry, with its file and
line or index; each file that cannot be read at all. **Errors** are what training refuses (the recipes
stop at the first of them, before training starts); **warnings** only shrink the data, and training
says so too (e.g. captions whose image has no features are skipped, with a count).

:func:`image_problem` is the one definition of "an image that cannot train"; the recipes' pre-flight
(:func:`verify_images`) and this report share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from interbert.data.captions import Caption
from interbert.data.features import FeatureStore, Regions
from interbert.errors import DataError

BOX_TOLERANCE_PX = 1.0  # detectors round boxes; a pixel outside the image is normal
MAX_LISTED = 20  # problems listed per kind; the count is always the total
MAX_INLINE = 10  # ids shown in a warning line


def image_problem(regions: Regions, feature_dim: int) -> str | None:
    """Why one image's regions cannot train (None when they can). Boxes a little outside the image
    are not a problem here (training clips them); see :func:`boxes_outside`."""
    features, boxes = regions.features, regions.boxes
    if features.ndim != 2:
        return f"features of shape {features.shape}, expected regions x {feature_dim}"
    if regions.num_regions == 0:
        return "no regions"
    if features.shape[1] != feature_dim:
        return f"{features.shape[1]}-d features, but the store's are {feature_dim}-d"
    if len(boxes) != len(features):
        return f"{len(boxes)} boxes for {len(features)} regions"
    if regions.class_probs is not None and len(regions.class_probs) != len(features):
        return f"{len(regions.class_probs)} class distributions for {len(features)} regions"
    nonfinite = ~(np.isfinite(features).all(1) & np.isfinite(boxes).all(1))
    if regions.class_probs is not None:
        nonfinite |= ~np.isfinite(regions.class_probs).all(1)
    if nonfinite.any():
        return f"non-finite values (NaN or inf) in {int(nonfinite.sum())} of {len(features)} regions"
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        return f"{int(inverted.sum())} of {len(boxes)} boxes have x2 < x1 or y2 < y1"
    return None


def boxes_outside(regions: Regions) -> bool:
    b, t = regions.boxes, BOX_TOLERANCE_PX
    return bool((b[:, :2] < -t).any() or (b[:, 2] > regions.image_w + t).any() or (b[:, 3] > regions.image_h + t).any())


def read_checked(store: FeatureStore, image_id: str) -> tuple[Regions | None, str | None]:
    """``(regions, None)`` for a usable image, ``(regions or None, why not)`` otherwise. A reader's
    DataError (an undecodable line, a wrong count) is one image's problem, not the end of the check."""
    try:
        regions = store[image_id]
    except DataError as e:
        return None, str(e)
    problem = image_problem(regions, store.feature_dim)
    return regions, None if problem is None else f"{store.path}: image {image_id!r}: {problem}"


def verify_images(store: FeatureStore, image_ids: Sequence[str], progress: bool = False) -> None:
    """Read each image a run will use once and refuse the run when one cannot train (naming the first
    and counting all): a bad image fails now, not hours into training, and NaN never reaches a loss."""
    from tqdm.auto import tqdm

    bad: dict[str, str] = {}
    for image_id in tqdm(image_ids, desc="checking features", unit="img", disable=not progress):
        _, problem = read_checked(store, image_id)
        if problem is not None:
            bad[image_id] = problem
    if bad:
        first = next(iter(bad.values()))
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{first}{others}; {len(bad)} of {len(image_ids)} images cannot train: "
                        "`interbert data check` lists them all")


def _n(count: int, noun: str, plural: str | None = None) -> str:
    """``1 image``, ``2 images``."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _ids(ids: Sequence[str], limit: int = MAX_INLINE) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _listing(items: Sequence[str]) -> list[str]:
    lines = [f"  {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"  ... and {len(items) - MAX_LISTED} more")
    return lines


@dataclass
class DataReport:
    captions_path: str | None = None
    features_path: str | None = None
    num_captions: int = 0
    num_caption_images: int = 0
    num_feature_images: int = 0
    feature_dim: int = 0
    caption_image_ids_with_features: list[str] = field(default_factory=list)  # the trainable images
    captions_without_features: list[str] = field(default_factory=list)  # image ids; training skips their captions
    num_captions_without_features: int = 0
    features_without_captions: list[str] = field(default_factory=list)
    images_with_boxes_outside: list[str] = field(default_factory=list)
    bad_images: dict[str, str] = field(default_factory=dict)  # image id -> why it cannot train
    bad_entries: list[str] = field(default_factory=list)  # malformed caption / VCR entries, with their place
    blank_captions: str | None = None  # "file: N blank captions ...: ids", training skips them
    unreadable: list[str] = field(default_factory=list)  # files that cannot be read at all, and why
    vcr_path: str | None = None
    num_vcr_items: int = 0
    vcr_items_without_features: list[str] = field(default_factory=list)  # "file:line (image id ...)"
    used_image_ids: set[str] = field(default_factory=set)  # images that captions or VCR items point to
    num_used_images: int = 0  # of those, the ones in the store: what training reads

    @property
    def bad_used_images(self) -> dict[str, str]:
        return {i: why for i, why in self.bad_images.items() if i in self.used_image_ids}

    @property
    def bad_unused_images(self) -> dict[str, str]:
        return {i: why for i, why in self.bad_images.items() if i not in self.used_image_ids}

    def _sections(self) -> list[tuple[str, str, list[str]]]:
        """``(level, summary, details)`` for every finding; level is ``error`` or ``warning``."""
        out: list[tuple[str, str, list[str]]] = []
        if self.captions_without_features:
            ids = self.captions_without_features
            out.append(("warning", f"{_n(len(ids), 'image')} with captions {'has' if len(ids) == 1 else 'have'} no "
                                   f"features; training skips {_n(self.num_captions_without_features, 'caption')}: "
                                   f"{_ids(ids)}", []))
        if self.blank_captions:
            out.append(("warning", f"{self.blank_captions}; training skips them", []))
        if self.features_without_captions:
            ids = self.features_without_captions
            out.append(("warning", f"{_n(len(ids), 'image')} in the feature store {'is' if len(ids) == 1 else 'are'} "
                                   f"not used (named by no caption or VCR item): {_ids(ids)}", []))
        if self.images_with_boxes_outside:
            ids = self.images_with_boxes_outside
            out.append(("warning", f"{_n(len(ids), 'image')} with boxes outside the picture (training clips them): "
                                   f"{_ids(ids)}", []))
        if self.bad_unused_images:
            bad = self.bad_unused_images
            out.append(("warning", f"{_n(len(bad), 'image')} not used cannot train either",
                        list(bad.values())))
        out += [("error", message, []) for message in self.unreadable]
        if self.bad_entries:
            out.append(("error", f"{_n(len(self.bad_entries), 'malformed entry', 'malformed entries')} (training "
                                 "stops at the first)",
                        self.bad_entries))
        bad = self.bad_used_images
        if bad:
            out.append(("error", f"{len(bad)} of {_n(self.num_used_images, 'image')} cannot train", list(bad.values())))
        if self.vcr_items_without_features:
            out.append(("error", f"{_n(len(self.vcr_items_without_features), 'VCR item')} without features",
                        self.vcr_items_without_features))
        if self.captions_path and self.features_path and not self.unreadable and not self.caption_image_ids_with_features:
            out.append(("error", "no image has both captions and features (do the ids match?)", []))
        return out

    @property
    def errors(self) -> list[str]:
        """Problems that stop training (warnings such as unmatched ids only shrink the data)."""
        return [summary for level, summary, _ in self._sections() if level == "error"]

    def lines(self) -> list[str]:
        out = []
        if self.captions_path:
            out.append(f"captions: {self.num_captions} for {self.num_caption_images} images ({self.captions_path})")
        if self.vcr_path:
            out.append(f"VCR: {self.num_vcr_items} items ({self.vcr_path})")
        out.append(f"feature store: {self.num_feature_images} images, feature dim {self.feature_dim} ({self.features_path})")
        if self.captions_path:
            out.append(f"trainable images (captions and features): {len(self.caption_image_ids_with_features)}")
        for level, summary, details in self._sections():
            out.append(f"{level}: {summary}")
            out += _listing(details)
        out.append("OK: the data can train" if not self.errors else "FAILED: the data cannot train as it is")
        return out


def check_data(captions: Sequence[Caption] | None, store: FeatureStore, progress: bool = False,
               vcr_items: Sequence | None = None, report: DataReport | None = None) -> DataReport:
    """Read every image of the store once and report what would go wrong in training."""
    from tqdm.auto import tqdm

    report = report or DataReport()
    report.features_path = report.features_path or str(store.path)
    feature_ids = store.ids()
    feature_set = set(feature_ids)
    report.num_feature_images, report.feature_dim = len(feature_ids), store.feature_dim
    if captions is not None:
        caption_ids = sorted({c.image_id for c in captions})
        missing = {i for i in caption_ids if i not in feature_set}
        report.captions_path = report.captions_path or "captions"
        report.num_captions, report.num_caption_images = len(captions), len(caption_ids)
        report.captions_without_features = sorted(missing)
        report.num_captions_without_features = sum(c.image_id in missing for c in captions)
        report.caption_image_ids_with_features = [i for i in caption_ids if i in feature_set]
        report.used_image_ids |= set(caption_ids)
    if vcr_items is not None:
        report.num_vcr_items = len(vcr_items)
        report.vcr_items_without_features = [f"{item.source}: image id {item.image_id!r} (the stem of img_fn)"
                                              for item in vcr_items if item.image_id not in feature_set]
        report.used_image_ids |= {item.image_id for item in vcr_items}
    if captions is None and vcr_items is None:  # nothing to match (e.g. the captions could not be read): all count
        report.used_image_ids |= feature_set
    report.features_without_captions = [i for i in feature_ids if i not in report.used_image_ids]
    report.num_used_images = len(report.used_image_ids & feature_set)
    for image_id in tqdm(feature_ids, desc="checking features", unit="img", disable=not progress):
        regions, problem = read_checked(store, image_id)
        if problem is not None:
            report.bad_images[image_id] = problem
        elif boxes_outside(regions):
            report.images_with_boxes_outside.append(image_id)
    return report


def check_files(features: str | Path, captions: str | Path | None = None, captions_format: str = "auto",
                vcr: str | Path | None = None, images_root: str | Path | None = None, trust_pickle: bool = False,
                progress: bool = False) -> DataReport:
    """:func:`check_data` from paths, reading past every malformed entry and going on when one file
    cannot be read at all (what can still be checked is)."""
    from interbert.data.captions import blank_captions, blank_captions_message, read_captions
    from interbert.data.features import open_features
    from interbert.data.vcr import read_vcr

    report = DataReport(captions_path=str(captions) if captions else None, features_path=str(features),
                        vcr_path=str(vcr) if vcr else None)
    problems: list = []
    caption_list = vcr_items = store = None
    if captions:
        try:
            caption_list = read_captions(captions, captions_format, problems=problems)
            blank = blank_captions(caption_list)
            if blank:
                report.blank_captions = blank_captions_message(captions, blank)
                caption_list = [c for c in caption_list if c.text.strip()]  # as training reads them
        except DataError as e:
            report.unreadable.append(str(e))
    if vcr:
        try:
            vcr_items = read_vcr(vcr, images_root, problems=problems)
        except DataError as e:
            report.unreadable.append(str(e))
    try:
        store = open_features(features, trust_pickle=trust_pickle)
    except DataError as e:
        report.unreadable.append(str(e))
    report.bad_entries = [str(p) for p in problems]
    if store is not None:
        check_data(caption_list, store, progress=progress, vcr_items=vcr_items, report=report)
    elif caption_list is not None:
        report.num_captions, report.num_caption_images = len(caption_list), len({c.image_id for c in caption_list})
    return report
