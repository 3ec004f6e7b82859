"""Reading the text files users bring (captions, VCR lines, GLUE TSVs) with errors that name the place.

A bare ``UnicodeDecodeError`` or ``JSONDecodeError`` says neither which file nor which line; these
helpers turn them into :class:`DataFormatError` (``file:line: ...``). A UTF-8 byte-order mark is
skipped: editors on Windows write one and it is not part of the data.

Readers take ``problems``: ``None`` to raise the first malformed entry (training refuses bad data), or
a list that collects every one of them while reading goes on (``interbert data check`` lists them all).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

from interbert.data.errors import DataFormatError


def report(problems: list[DataFormatError] | None, error: DataFormatError) -> None:
    """Raise ``error``, or record it when the caller collects problems (and skips the entry)."""
    if problems is None:
        raise error
    problems.append(error)


def _not_utf8(path: str | Path, data: bytes, error: UnicodeDecodeError, line: int | None = None) -> DataFormatError:
    """Where in ``data`` (the file, or its line ``line``) decoding failed, as line and column."""
    start = error.start
    if line is None:
        line = data.count(b"\n", 0, start) + 1
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    return DataFormatError(path, f"not UTF-8 text: byte 0x{data[start]:02x} at column {column} "
                                 "(re-save the file as UTF-8)", line)


def read_text(path: str | Path) -> str:
    """The whole file decoded as UTF-8 (a byte-order mark dropped)."""
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data, e) from None


def load_json(path: str | Path) -> object:
    """One JSON document; malformed or truncated JSON names the line and column where parsing stopped."""
    text = read_text(path)
    if not text.strip():
        raise DataFormatError(path, "empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # the parser ran into the end of the text: an unterminated string, or a value still open
        ended = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        hint = " (the file ends early: truncated?)" if ended else ""
        raise DataFormatError(path, f"malformed JSON: {e.msg} (column {e.colno}){hint}", line=e.lineno) from None
    except RecursionError:
        raise DataFormatError(path, "malformed JSON: nested too deeply") from None


def text_lines(path: str | Path, problems: list[DataFormatError] | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line, the line ending removed. A line that is not UTF-8 is
    reported (raised, or recorded in ``problems`` and skipped); the others still read."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report(problems, _not_utf8(path, raw, e, line=line_no))
                continue
            yield line_no, text.rstrip("\r\n")
