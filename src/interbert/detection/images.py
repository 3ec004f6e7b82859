"""Decoding an image to the pixels the detector takes: H x W x 3 uint8 RGB, upright as viewers show it.

One path for an image file, a PIL image and an array, so that ``interbert extract`` (files) and the
processor's ``images=`` (what a caller holds in memory) give the detector the same pixels for the same picture.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from interbert.errors import UsageError


class ImageDecodeError(Exception):
    """An image file that cannot be read; the message names the file."""


def decode_image(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB, upright (EXIF orientation applied, as viewers show it)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return upright_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"{path}: {type(error).__name__}: {error}") from error


def upright_rgb(image) -> np.ndarray:
    """A PIL image as :func:`decode_image` gives a file's pixels: decoded now (a truncated file fails here
    and not later), EXIF orientation applied, RGB, a writable uint8 copy (for torch)."""
    from PIL import ImageOps

    image.load()
    return np.array(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)


def image_pixels(image, where: str = "image") -> np.ndarray:
    """H x W x 3 uint8 RGB of an image file (a path), a PIL image or such an array: what
    ``interbert extract`` feeds its detector for a file, for images a caller holds in memory."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return decode_image(Path(image))
    if isinstance(image, Image.Image):
        try:
            return upright_rgb(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            named = getattr(image, "filename", "") or "a PIL image"
            raise ImageDecodeError(f"{where} ({named}): {type(error).__name__}: {error}") from error
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UsageError(f"{where}: an image array must be H x W x 3 uint8 RGB, got {image.dtype} {image.shape}")
        return image
    raise UsageError(f"{where}: cannot read an image from a {type(image).__name__}; give a path to an image file, "
                     "a PIL image, or an H x W x 3 uint8 RGB array")
