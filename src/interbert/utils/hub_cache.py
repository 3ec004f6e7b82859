"""Pretrained folders named the Hugging Face way (``bert-base-uncased``, ``org/name``), found offline.

Nothing is downloaded at run time (the project's rule): a name that is not a folder is looked up in
the local Hugging Face cache (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), where
``huggingface-cli download`` or any earlier ``from_pretrained`` put it.
"""

from __future__ import annotations

from pathlib import Path

from interbert.errors import UsageError


def local_pretrained(name_or_path: str | Path) -> Path:
    """``name_or_path`` as a folder when it is one, else its snapshot in the local Hugging Face cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError):
        raise UsageError(
            f"{name_or_path} is neither a folder nor a model in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); nothing is downloaded at run time: give a folder, or fetch it into the "
            "cache first (huggingface-cli download NAME)"
        ) from None
