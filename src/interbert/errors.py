"""The project's own errors, and how the command line reports them.

Every error a user can cause by what they pass in (a setting, a file, a line of data) is one of
these. The CLI prints it as one line, ``error: <message>``, and exits with its ``exit_code``: 2 for a
usage or config problem (what was asked cannot be run as written), 1 for data that cannot be used.
The message names the place: the config key, the file and line, or the image id and its store.
A traceback is shown only with ``interbert --debug`` or ``INTERBERT_DEBUG=1``.
"""

from __future__ import annotations

USAGE_EXIT = 2
DATA_EXIT = 1


class InterBertError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = DATA_EXIT


class UsageError(InterBertError, ValueError):
    """A setting, argument or config that cannot be used as given (a missing required setting, a bad value)."""

    exit_code = USAGE_EXIT


class DataError(InterBertError, ValueError):
    """Data that cannot be used: the message names the file and line, or the image id and store."""

    exit_code = DATA_EXIT


MAX_SHOWN = 200  # characters of a user's value quoted in a message


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters. reprlib stops walking a nested value
    after a few items per level, so a huge value (a YAML alias bomb expands to billions of items) costs
    no time or memory to quote, and a long string is cut in the middle with ``...``."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 4, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
