"""Console logging for the command line. The library only logs, through its modules' own loggers
(``logging.getLogger(__name__)``); handlers, levels and formats are the program's choice, made here by the
``interbert`` commands that report progress, and by nothing a library user imports."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

TRAINING_FORMAT = "%(asctime)s %(name)s: %(message)s"  # training and evaluation: when each line came
SERVICE_FORMAT = "%(levelname)s %(name)s: %(message)s"  # index and services: how serious each line is

# Third-party loggers whose INFO lines are noise on our console: faiss says at every import which CPU
# extensions it loaded ("Could not load library with AVX512 support ...").
QUIET_LOGGERS = ("faiss",)


def setup_cli_logging(fmt: str = TRAINING_FORMAT, datefmt: str | None = "%H:%M:%S") -> None:
    """INFO and above to stderr, once per process: a later call (another command in the same process, a
    program that configured logging itself, pytest's capture) leaves the first set-up in place."""
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt=datefmt)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def quieted(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """``name``'s logger at ``level`` inside the block, its own level again after: library code that calls a
    noisy third party silences it for that call only, leaving the program's logging as it found it."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
