"""Finding, naming and sharding the user's images; decoding them is the library's
(:mod:`interbert.detection.images`, re-exported here, where ``interbert extract`` always had it)."""

from __future__ import annotations

import os
from pathlib import Path

from interbert.detection.images import ImageDecodeError, decode_image, image_pixels, upright_rgb

__all__ = [
    "IMAGE_SUFFIXES", "ImageDecodeError", "decode_image", "image_pixels", "list_images", "parse_shard",
    "shard_from_environment", "shard_ids", "upright_rgb",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


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
