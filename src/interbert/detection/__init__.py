"""Regions from images: the detector and image decoding that ``interbert extract`` and the processor's
``images=`` share, in the library so that the processor never imports the command (issue 25).

- :mod:`~interbert.detection.detector`: the torchvision Faster R-CNN R50-FPN wrapper (``RegionDetector``,
  ``DetectorConfig``, weights from a local file only)
- :mod:`~interbert.detection.images`: decoding an image file, a PIL image or an array to upright RGB pixels
- :mod:`~interbert.detection.image_detector`: one image in memory -> the regions a feature store holds for it

This package itself imports neither torch nor torchvision: the detector is the optional ``[extract]``
extra, and :func:`require_torchvision` is its one-line error for whoever asks for it.
"""

from __future__ import annotations

import importlib.util

from interbert.extras import MissingExtraError

# torchvision must be the build made for the installed torch, which is why the checkout has its own venv
MISSING_TORCHVISION_HINT = (
    "with the torchvision build made for your torch; in this checkout: `make venv-extract`, "
    "then .venv-extract/bin/interbert, see docs/extract.md"
)


def require_torchvision(needed_by: str) -> None:
    """Stop with the ``[extract]`` extra's usage error (naming ``needed_by``) before the detector's modules,
    which import torchvision at the top, fail with an ImportError traceback."""
    if importlib.util.find_spec("torchvision") is None:
        raise MissingExtraError("extract", "torchvision", needed_by, MISSING_TORCHVISION_HINT)
