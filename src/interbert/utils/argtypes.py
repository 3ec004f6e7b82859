"""Value types for command-line options (argparse ``type=``): a bad value is refused by argparse with
the option's name and exit 2, before any work starts. Light: imports nothing but argparse."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def seconds(text: str) -> float:
    """A duration of 0 or more seconds."""
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def positive_seconds(text: str) -> float:
    """A duration of more than 0 seconds."""
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value
