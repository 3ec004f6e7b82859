"""Errors raised by the data layer. Each names the place (file and line, or image id and store)."""

from __future__ import annotations

from pathlib import Path

from interbert.errors import DataError


class DataFormatError(DataError):
    """A file does not hold what its format promises. The message starts with ``file:line``."""

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        self.path, self.line = str(path), line
        place = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{place}: {message}")


class UnknownImageError(DataError, KeyError):
    """An image id that the feature store does not hold."""

    def __init__(self, image_id: str, store_path: str | Path):
        self.image_id, self.store_path = image_id, str(store_path)
        super().__init__(image_id)

    def __str__(self) -> str:
        return f"image id {self.image_id!r} is not in the feature store {self.store_path}"
