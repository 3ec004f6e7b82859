"""YAML config files with dotted ``key=value`` overrides from the command line.

A recipe's config is one YAML mapping, e.g. ``train: {learning_rate: 1.0e-4}``.
On the command line ``train.learning_rate=2e-4`` replaces that value; the value is parsed as YAML,
so ``true``, ``null``, ``[1, 2]`` and ``{a: 1}`` work. Only keys that the file already has can be
overridden, and those a recipe declares optional (``optional_keys``: every ``TrainConfig`` field under
``train``, listed in the file or not): a typo must fail loudly, not train with the default silently.

The shipped configs are package data (``src/interbert/configs/*.yaml``; the checkout's top-level
``configs/`` links there), so a non-editable install has them too: ``--config`` takes a file path or
the name of a shipped config (``pretrain_tiny``), and each recipe defaults to its shipped config.

A value of ``???`` (OmegaConf's and Hydra's "mandatory, no default") must be given on the command line
before a recipe runs (:func:`mandatory_keys`; ``pretrain_base.yaml`` has ``model.from_bert: ???``, as there is
no sensible default for where BERT lives); the file itself loads, e.g. to be printed or checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Collection, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from interbert.errors import MAX_SHOWN, UsageError, shown


class ConfigError(UsageError):
    """A config file or override that cannot be used; the message names the file and key."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``); ``1e-4`` would silently become
    the *string* "1e-4" and reach the optimizer as such.
    """


FLOAT_RESOLVER = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_RESOLVER, list("-+0123456789."))

# A config is a few hundred values; aliases (``*name``) may repeat a section, but not multiply it: nine levels
# of ``&a [*a, *a, ...]`` ("billion laughs") are a few lines that expand to 10^9 values, which every walk over
# the settings (checking, copying, quoting in a message) pays for in time and memory.
MAX_EXPANDED_NODES = 100_000
MAX_CONFIG_BYTES = 1 << 20  # the shipped configs are ~2 KB; a file a thousand times larger is not a config


class _TooLarge(Exception):
    """The document expands past MAX_EXPANDED_NODES, or an alias refers to its own node."""


def expanded_size(node: yaml.Node, limit: int = MAX_EXPANDED_NODES) -> int:
    """How many nodes ``node`` stands for once every alias is written out, counted without expanding anything
    (a node shared through aliases is sized once); :class:`_TooLarge` past ``limit`` or on a cycle."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_nodes:
            raise _TooLarge("an alias refers to a node that contains it (a recursive structure)")
        open_nodes.add(id(n))
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(child) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        open_nodes.discard(id(n))
        if total > limit:
            raise _TooLarge(f"its aliases expand it to more than {limit:,} values")
        sizes[id(n)] = total
        return total

    return size(node)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message on one line: where (line and column) and what, without the quoted source
    excerpt and caret it draws over several lines."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = f"{where}{context + ', ' if context else ''}{problem}"
    return _one_line(text)


def _one_line(text: str, limit: int = MAX_SHOWN) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_yaml(text: str, source: str) -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()  # composing shares an aliased node: cheap whatever its expansion
        if node is None:
            return None
        try:
            expanded_size(node)
        except _TooLarge as e:
            raise ConfigError(f"{source}: refused: {e} (a YAML alias bomb?)") from None
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML: {_yaml_problem(error)}") from None
    except RecursionError:
        # PyYAML composes and constructs recursively: "[[[[...]]]]" thousands deep exhausts Python's stack
        raise ConfigError(f"{source}: refused: nested too deeply") from None
    except ConfigError:
        raise
    except ValueError as error:
        # a scalar the constructor cannot turn into a value, e.g. an int of more than 4,300 digits
        raise ConfigError(f"{source}: refused a value: {_one_line(str(error))}") from None
    finally:
        loader.dispose()


def parse_override(override: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=2e-4"`` -> ``(["train", "learning_rate"], 0.0002)``."""
    key, sep, raw_value = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {shown(override)} is not of the form dotted.key=value")
    path = key.split(".")
    if any(not part for part in path):
        raise ConfigError(f"override {shown(override)} has an empty part in its key {shown(key)}")
    return path, _parse_yaml(raw_value, f"override {shown(override)}")


def set_dotted(
    config: dict, path: list[str], value: Any, text: str, source: str,
    known_keys: Callable[[list[str], dict], Collection[str] | None],
) -> None:
    """Set ``config[path[0]][path[1]]... = value`` in place (``text``: the override, for messages).
    ``known_keys(prefix, node)``: the keys the mapping at ``prefix`` may hold (None: any); a missing
    mapping on the way is created, a key it may not hold is refused with the ones it may."""
    node = config
    for depth, part in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        if not isinstance(node, dict):
            raise ConfigError(
                f"{source}: cannot override {'.'.join(path)!r}: "
                f"{'.'.join(path[:depth])!r} is a {type(node).__name__}, not a mapping"
            )
        known = known_keys(path[:depth], node)
        if known is not None and part not in known:
            listed = ", ".join(map(str, known)) or "(none)"
            raise ConfigError(f"{source}: unknown config key {shown(dotted)} in override {shown(text)}; "
                              f"known keys here: {listed}")
        if depth == len(path) - 1:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}  # a section the file leaves out (or null): its defaults, then this key
            node = node[part]


def apply_override(
    config: dict, override: str, source: str = "config", optional_keys: Mapping[str, Collection[str]] | None = None
) -> None:
    """Set one dotted ``key=value`` in ``config`` in place. The key must exist already, or be one of
    ``optional_keys[parent]`` (``parent``: the dotted path of its mapping, e.g. ``"train"``). A config
    with a schema uses :func:`interbert.utils.typed_config.override` instead."""
    path, value = parse_override(override)

    def known(prefix: list[str], node: dict) -> list[str]:
        return sorted({*map(str, node), *(optional_keys or {}).get(".".join(prefix), ())})

    set_dotted(config, path, value, override, source, known)


def packaged_configs() -> dict[str, Path]:
    """The configs shipped inside the package, by name (``"pretrain_tiny"`` -> its ``.yaml`` path)."""
    # A wheel installs as plain files, so the resource is a real path (a zip import would not be; the
    # project does not support being imported from a zip).
    folder = resources.files("interbert") / "configs"
    return {Path(str(entry)).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_config(value: str | Path) -> Path:
    """``--config``'s value as a path: an existing file as given, else a shipped config's name
    (``pretrain_tiny`` or ``pretrain_tiny.yaml``). Anything else is returned as given, for
    :func:`load_config` to report as missing."""
    path = Path(value)
    if path.is_file() or len(path.parts) != 1:
        return path  # a file, or a path with folders: never silently swapped for a shipped config
    return packaged_configs().get(path.name.removesuffix(".yaml"), path)


def read_config(path: str | Path) -> tuple[Path, dict]:
    """A YAML config file (a path, or a shipped config's name) as its path and top-level mapping."""
    path = resolve_config(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        shipped = ", ".join(sorted(packaged_configs())) or "(none)"
        raise ConfigError(f"config file {path} does not exist (shipped configs, usable by name: {shipped})")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes is not a config (at most {MAX_CONFIG_BYTES:,} bytes are read)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    config = _parse_yaml(text, str(path))
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(config).__name__}")
    return path, config


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    optional_keys: Mapping[str, Collection[str]] | None = None,
) -> dict:
    """Read a YAML config file and apply ``dotted.key=value`` overrides in order (see :func:`apply_override`)."""
    path, config = read_config(path)
    for override in overrides:
        apply_override(config, override, source=str(path), optional_keys=optional_keys)
    return config


MANDATORY = "???"


def mandatory_keys(config: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose value is still ``???`` (``config``: a mapping or typed settings, a dataclass)."""
    if dataclasses.is_dataclass(config):
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    keys = []
    for key, value in config.items():
        if isinstance(value, Mapping) or dataclasses.is_dataclass(value):
            keys += mandatory_keys(value, f"{prefix}{key}.")
        elif value == MANDATORY:
            keys.append(f"{prefix}{key}")
    return keys


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """Add ``--config FILE|NAME`` and trailing ``key=value`` overrides to a recipe's sub-parser.

    ``default_config``: the name of the recipe's shipped config (``"pretrain_tiny"``), used when
    ``--config`` is not given; ``None`` makes ``--config`` required."""
    shipped = packaged_configs()
    if default_config is not None and default_config not in shipped:
        # a programming error (a renamed YAML), caught by any test that builds the parser
        raise ValueError(f"no shipped config named {default_config!r}; shipped: {sorted(shipped)}")
    parser.add_argument(
        "--config",
        # a shipped config's name becomes its path here, so recipes log and report the file they read
        type=lambda value: str(resolve_config(value)),
        default=None if default_config is None else str(shipped[default_config]),
        required=default_config is None,
        help=f"YAML config file, or a shipped config's name ({', '.join(sorted(shipped))})"
        + ("" if default_config is None else f"; default: {default_config}"),
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides of the config, e.g. train.max_steps=100"
    )
