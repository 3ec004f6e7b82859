"""Detection of images a caller hands over (the processor's ``images=``), as ``interbert extract`` detects files.

The command's steps by the functions the command runs: :func:`~interbert.detection.images.image_pixels` (a
file through ``decode_image``: EXIF upright, RGB), ``image_tensor``, ``RegionDetector.detect``,
``ImageRegions.as_regions``; so an image's regions equal the entry ``interbert extract`` writes for its
file with the same settings at ``--batch-size 1`` (the default). Images go through the detector one at a
time: within a batch it pads them to a common size, which would make an image's regions depend on its
neighbours in the call.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any

from interbert.data.features import Regions
from interbert.detection.detector import (
    DetectorConfig,
    RegionDetector,
    build_detector,
    default_device,
    image_tensor,
    warn_random_weights,
)
from interbert.detection.images import ImageDecodeError, image_pixels
from interbert.errors import DataError, UsageError, shown

# the settings a processor records beside the weights path (DetectorConfig's fields but the weights)
SETTING_TYPES = {f.name: f.type for f in dataclasses.fields(DetectorConfig) if f.name != "weights"}


def detector_config(weights: str | os.PathLike, settings: dict[str, Any]) -> DetectorConfig:
    """``DetectorConfig`` from a weights path and ``interbert extract``'s settings (``min_size=...``); a bad
    key or value is a usage error naming it."""
    if not isinstance(weights, (str, os.PathLike)):
        raise UsageError(f"the detector weights must be a path (or 'random'), not {shown(weights)}")
    unknown = sorted(set(settings) - set(SETTING_TYPES))
    if unknown:
        raise UsageError(f"unknown detector setting {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(SETTING_TYPES)}")
    for key, value in settings.items():
        wanted = SETTING_TYPES[key]
        if value is None and "None" in wanted:
            continue
        fits = {"str": isinstance(value, str), "float": isinstance(value, numbers.Real)}.get(
            wanted, isinstance(value, numbers.Integral))  # the int fields, optional or not
        if not fits or isinstance(value, bool):
            raise UsageError(f"detector setting {key} must be {wanted}, not {shown(value)}")
    try:
        return DetectorConfig(weights=str(weights), **settings)
    except ValueError as error:
        raise UsageError(f"detector settings: {error}") from None


class ImageDetector:
    """A loaded detector that turns one image (a path, a PIL image, an H x W x 3 uint8 array) into the
    :class:`~interbert.data.Regions` a feature store holds for it."""

    def __init__(self, config: DetectorConfig, device: str | None = None):
        try:
            model, self.num_classes = build_detector(config)
        except (FileNotFoundError, ValueError) as error:  # both messages name the weights file
            raise DataError(str(error)) from None
        if config.random_weights:
            warn_random_weights()
        self.config = config
        self.detector = RegionDetector(model, config, device or default_device())

    def __call__(self, image, where: str = "image") -> Regions:
        try:
            pixels = image_pixels(image, where)
        except ImageDecodeError as error:
            raise DataError(f"{where}: cannot decode the image: {error}") from None
        return self.detector.detect([image_tensor(pixels)])[0].as_regions()

    def __deepcopy__(self, memo) -> "ImageDetector":
        # Processors deep-copy themselves to serialise (ProcessorMixin.to_dict): the weights are only read,
        # so copies share them rather than copy a ResNet-50 for a JSON file.
        return self
