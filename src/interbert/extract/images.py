"""Finding, naming, sharding and decoding the user's images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from interbert.errors import UsageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class ImageDecodeError(Exception):
    """An image file that cannot be read; the message names the file."""


def list_images(root: str | Path) -> tuple[dict[str, Path], list[Path]]:
    """``({image id: path}, [other files])`` for a folder (searched recursively) or one image file.

    The id is the path relative to the folder without its suffix (``1016887272`` for
    ``1016887272.jpg``; ``movie/shot@0`` in nested folders, as VCR names its images), so it is stable
    across machines. Files with other suffixes are returned, not hidden, so the report can list them.
    """
    root = Path(root)
    if root.is_file():
        return {root.stem: root}, []
    if not root.is_dir():
        raise FileNotFoundError(f"images not found: {root} is neither a folder nor a file")
    images: dict[str, Path] = {}
    others: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            others.append(path)
            continue
        image_id = path.relative_to(root).with_suffix("").as_posix()
        if image_id in images:
            raise ValueError(f"two images share the id {image_id!r}: {images[image_id]} and {path}")
        images[image_id] = path
    return images, others


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return index, count


def shard_from_environment(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """The (rank, world size) torchrun sets, or ``(0, 1)`` outside a distributed launch."""
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    rank = int(environ.get("RANK", "0"))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return rank, world_size


def shard_ids(image_ids: list[str], index: int, count: int) -> list[str]:
    """Every ``count``-th id of the sorted list, starting at ``index``: shards are disjoint, cover all
    ids, and do not depend on which process lists the folder."""
    return sorted(image_ids)[index::count]


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
