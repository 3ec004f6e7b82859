"""Crash-safe file writes, the one way every writer in the project replaces a file.

A write goes to a temporary file beside the target, is flushed and fsynced, renamed over the target
(``os.replace`` is atomic on POSIX), and the folder is fsynced so the rename itself survives a power
loss. If anything fails on the way (a full disk, an exception in the writer, Ctrl-C), the temporary
file is removed and the target still holds its previous content: readers see the old file or the
new one, never half of one, and no ``*.tmp`` litter is left behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

logger = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique per process and thread, so concurrent writers never share one."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make renames and creations inside ``path`` durable. Some filesystems cannot fsync a folder
    (EINVAL/EBADF/EISDIR); there the rename is as durable as the filesystem allows."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to (for writers that take a file name,
    such as ``faiss.write_index`` or ``safetensors``); on a clean exit it replaces ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Replace ``path`` with what ``write(handle)`` writes to a binary handle."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_link(source: str | Path, path: str | Path) -> None:
    """Replace ``path`` with the content of ``source``: a hard link (no second copy on disk), or a copy
    where the filesystem has no hard links."""
    with atomic_path(path) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def _previous_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.previous")


def replace_folder(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Replace the folder ``path`` with what ``write(folder)`` puts into an empty folder.

    ``write`` fills a temporary folder beside ``path``; only when it has finished (and its files are
    fsynced) does that folder take ``path``'s name. A failure while writing removes the temporary folder
    and leaves ``path`` as it was. Two renames swap the folders (POSIX cannot replace a non-empty folder
    in one): a crash between them leaves the previous content at ``.<name>.previous``, which the next
    call puts back before it starts, so a reader never finds a half-written folder under ``path``.
    """
    path = Path(path)
    previous = _previous_name(path)
    if previous.exists():
        if not path.exists():
            os.replace(previous, path)  # a crash between the two renames of an earlier call
        else:
            shutil.rmtree(previous)  # a crash after them, before the clean-up
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for written in tmp.rglob("*"):
            if written.is_file():
                fsync_file(written)
        fsync_dir(tmp)
        if path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if previous.exists() and not path.exists():  # the second rename failed: put the old one back
            os.replace(previous, path)
        raise
    fsync_dir(path.parent)
    shutil.rmtree(previous, ignore_errors=True)


# temporary_name's pattern: ".<target name>.tmp-<pid>-<thread id>"
TEMPORARY_NAME = re.compile(r"^\..+" + re.escape(TMP_MARK) + r"(?P<pid>\d+)-\d+$")


def leftover_temporaries(folder: str | Path) -> list[Path]:
    """Temporary files that a killed writer left in ``folder`` (a clean failure removes its own)."""
    return sorted(p for p in Path(folder).iterdir() if p.name.startswith(".") and TMP_MARK in p.name)


def writer_is_gone(path: Path) -> bool:
    """Whether the process whose :func:`temporary_name` is ``path`` has ended: only then is the file litter
    rather than a write in progress. A name not of the pattern, this process's own (another thread may be
    writing), or a process that lives (or that we may not signal) count as not gone."""
    match = TEMPORARY_NAME.match(path.name)
    if match is None:
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: no signal, only whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False
    return False


def remove_leftover_temporaries(folder: str | Path) -> list[Path]:
    """Remove what killed writers left in ``folder`` (a ``.checkpoint.pt.tmp-*`` can be tens of MB): only
    names of :func:`temporary_name`'s pattern, only directly in ``folder``, only of processes that have
    ended. Returns what was removed; a missing folder has none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in leftover_temporaries(folder):
        if not writer_is_gone(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)  # replace_folder's temporary folder
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        logger.warning("%s: removed %d temporary file(s) left by a killed write (%s)", folder, len(removed),
                       ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else ""))
    return removed


def update_digest(digest: Any, path: str | Path) -> Any:
    """Feed the bytes of ``path`` to a hashlib ``digest`` 1 MiB at a time (a checkpoint or a feature store is
    not read into memory whole); returns the digest."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    return update_digest(hashlib.sha256(), path).hexdigest()
