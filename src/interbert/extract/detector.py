"""The region detector, where ``interbert extract`` has always had it: it lives in the library
(:mod:`interbert.detection.detector`), which the processor's ``images=`` uses too; scripts that import it
from here keep working."""

from interbert.detection.detector import (
    CLASSIFIER_WEIGHT_KEY,
    DEFAULT_NUM_CLASSES,
    DETECTORS,
    RANDOM_WEIGHTS,
    DetectorConfig,
    ImageRegions,
    RegionDetector,
    build_detector,
    default_device,
    image_tensor,
    load_detector_state_dict,
    load_weights_into,
    region_count,
    versions,
    warn_random_weights,
)

__all__ = [
    "CLASSIFIER_WEIGHT_KEY", "DEFAULT_NUM_CLASSES", "DETECTORS", "RANDOM_WEIGHTS", "DetectorConfig", "ImageRegions",
    "RegionDetector", "build_detector", "default_device", "image_tensor", "load_detector_state_dict",
    "load_weights_into", "region_count", "versions", "warn_random_weights",
]
