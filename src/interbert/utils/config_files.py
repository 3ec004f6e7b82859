"""YAML config files with dotted ``key=value`` overrides from the command line.

A recipe's config is one YAML mapping (``configs/*.yaml``), e.g. ``train: {learning_rate: 1.0e-4}``.
On the command line ``train.learning_rate=2e-4`` replaces that value; the value is parsed as YAML,
so ``true``, ``null``, ``[1, 2]`` and ``{a: 1}`` work. Only keys that the file already has can be
overridden, and those a recipe declares optional (``optional_keys``: every ``TrainConfig`` field under
``train``, listed in the file or not): a typo must fail loudly, not train with the default silently.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

from interbert.errors import UsageError


class ConfigError(UsageError):
    """A config file or override that cannot be used; the message names the file and key."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``); ``1e-4`` would silently become
    the *string* "1e-4" and reach the optimizer as such.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 -- _Loader is a SafeLoader
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML: {error}") from error


def parse_override(override: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=2e-4"`` -> ``(["train", "learning_rate"], 0.0002)``."""
    key, sep, raw_value = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    path = key.split(".")
    if any(not part for part in path):
        raise ConfigError(f"override {override!r} has an empty part in its key {key!r}")
    return path, _parse_yaml(raw_value, f"override {override!r}")


def apply_override(
    config: dict, override: str, source: str = "config", optional_keys: Mapping[str, Collection[str]] | None = None
) -> None:
    """Set one dotted ``key=value`` in ``config`` in place. The key must exist already, or be one of
    ``optional_keys[parent]`` (``parent``: the dotted path of its mapping, e.g. ``"train"``)."""
    path, value = parse_override(override)
    node = config
    for depth, part in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        if not isinstance(node, dict):
            raise ConfigError(
                f"{source}: cannot override {'.'.join(path)!r}: "
                f"{'.'.join(path[:depth])!r} is a {type(node).__name__}, not a mapping"
            )
        optional = (optional_keys or {}).get(".".join(path[:depth]), ())
        if part not in node and depth == len(path) - 1 and part in optional:
            node[part] = value  # a key the file leaves at its default
            return
        if part not in node:
            known = ", ".join(sorted({*map(str, node), *optional})) or "(none)"
            raise ConfigError(
                f"{source}: unknown config key {dotted!r} in override {override!r}; known keys here: {known}"
            )
        if depth == len(path) - 1:
            node[part] = value
        else:
            node = node[part]


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    optional_keys: Mapping[str, Collection[str]] | None = None,
) -> dict:
    """Read a YAML config file and apply ``dotted.key=value`` overrides in order (see :func:`apply_override`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    config = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(config).__name__}")
    for override in overrides:
        apply_override(config, override, source=str(path), optional_keys=optional_keys)
    return config


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """Add ``--config FILE`` and trailing ``key=value`` overrides to a recipe's sub-parser."""
    parser.add_argument(
        "--config", default=default_config, required=default_config is None, help="YAML config file (configs/*.yaml)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides of the config, e.g. train.max_steps=100"
    )
