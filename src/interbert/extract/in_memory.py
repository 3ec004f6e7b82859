"""Detecting one image in memory, where it was first written: it lives in the library
(:mod:`interbert.detection.image_detector`), so that the processor's ``images=`` does not import this command;
scripts that import it from here keep working."""

from interbert.detection.image_detector import SETTING_TYPES, ImageDetector, detector_config

__all__ = ["SETTING_TYPES", "ImageDetector", "detector_config"]
