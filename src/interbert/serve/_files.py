"""Clean-up of what a killed writer of the search commands left behind (``index build``/``add``)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from interbert.utils.files import TMP_MARK, leftover_temporaries

logger = logging.getLogger(__name__)

# temporary_name() is ".<name>.tmp-<pid>-<thread>": the pid says whether its writer may still be running.
_WRITER_PID = re.compile(re.escape(TMP_MARK) + r"(\d+)-\d+$")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has not written anything yet: the file is an earlier run's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user holds that pid
    return True


def remove_leftover_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder`` (a crash-safe write removes its own
    when it fails cleanly; SIGKILL or a power loss leaves one behind). Files whose writer's process is still
    running are kept: another build may be writing them now. Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in leftover_temporaries(folder):
        match = _WRITER_PID.search(path.name)
        if match and _running(int(match.group(1))):
            continue
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("%s: removed %d temporary file(s) of an earlier run that was stopped while writing: %s",
                    folder, len(removed), ", ".join(p.name for p in removed))
    return removed
