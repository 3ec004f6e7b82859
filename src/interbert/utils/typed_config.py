"""Typed configs: dataclasses as the schema of a YAML config.

A recipe's settings are a dataclass whose fields are sections (``model``, ``data``, ``train``), each a
dataclass too. From that schema come:

- the defaults: a YAML file states only what it changes (the shipped ``*_tiny.yaml`` state the tiny choices);
- validation of a file, of a dict passed from Python, and of each override: types, choices, unknown keys,
  each refused in one error line naming the key (``pretrain_tiny.yaml: data.msm must be one of ...``);
- ``key=value`` overrides of every field, listed in the file or not (:func:`override`);
- the resolved YAML (:func:`to_yaml`, ``interbert <recipe> --print-config``), which reads back as the same settings.

Types understood: ``bool``, ``int``, ``float`` (an int is accepted), ``str`` (a path too), ``X | None``,
``dict[str, X]``, ``list[X]``, ``Any`` and nested dataclasses; :func:`choice` restricts a field to some
values, :func:`setting` says more (a check function, the expected value in messages). A dataclass's ``__post_init__`` checks what a type cannot say and raises ValueError; the message
gets the file and the section in front.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from interbert.errors import MAX_SHOWN, shown
from interbert.utils.config_files import ConfigError, FLOAT_RESOLVER, parse_override, read_config, set_dotted

T = TypeVar("T")
CHOICES = "choices"  # field metadata: the values the field may take
CHECK = "check"  # field metadata: check(value, key, source) -> value, run after the type check


EXPECT = "expect"  # field metadata: what a wrong value is told it must be (else said from the type)


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            choices: Iterable[Any] | None = None, check: Any = None, expect: str | None = None) -> Any:
    """A dataclass field with what :func:`from_dict` checks besides its type: ``choices`` (the values it
    may take), ``check(value, key, source) -> value`` (run after the type check; raises
    :class:`ConfigError` naming ``key``) and ``expect`` (the message's "must be ..." for a wrong type)."""
    metadata = {CHOICES: None if choices is None else tuple(choices), CHECK: check, EXPECT: expect}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def choice(default: Any, options: Iterable[Any]) -> Any:
    """A dataclass field restricted to ``options`` (``negatives: str = choice("tfidf", NEGATIVES)``)."""
    return setting(default, choices=options)


def checked(check: Any, default_factory: Any) -> Any:
    """A dataclass field whose typed value goes through ``check(value, key, source)``, e.g.
    ``model.overrides`` through InterBertConfig's fields."""
    return setting(default_factory=default_factory, check=check)


def section(kind: type) -> Any:
    """A dataclass field holding a nested section, by default all of its defaults."""
    return dataclasses.field(default_factory=kind)


@functools.cache
def _hints(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)


def _members(annotation: Any) -> tuple[Any, ...]:
    """The members of ``X | Y`` (``(annotation,)`` for anything else)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _describe(annotation: Any) -> str:
    names = []
    for kind in _members(annotation):
        origin = typing.get_origin(kind) or kind
        names.append({type(None): "null", dict: "a mapping", list: "a list"}.get(origin, getattr(origin, "__name__",
                                                                                               str(origin))))
    return " or ".join(names)


def _join(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def _same(value: Any, option: Any) -> bool:
    return type(value) is type(option) and value == option  # True is not 1 here


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def coerce(value: Any, annotation: Any, key: str, source: str = "config", choices: tuple | None = None,
           expect: str | None = None) -> Any:
    """``value`` checked against ``annotation`` (and ``choices``) for the setting ``key``: an int becomes a
    float where a float is expected, a path a str, a mapping a dataclass section; anything else that does
    not fit is a :class:`ConfigError` naming ``key``."""
    members = _members(annotation)
    if value is None and type(None) in members:
        return None
    if choices is not None:
        if not any(_same(value, option) for option in choices):
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, choices))}, not {shown(value)}")
        return value
    kinds = [kind for kind in members if kind is not type(None)]
    if len(kinds) == 1 and dataclasses.is_dataclass(kinds[0]):
        return from_dict(kinds[0], value, key, source)
    for kind in kinds:
        origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
        if kind is Any:
            return value
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # .nan / .inf read as floats, and no setting means them
                raise ConfigError(f"{source}: {key} must be a finite number, not {value!r}")
            return float(value)
        if origin is str and isinstance(value, str | os.PathLike):
            return os.fspath(value)
        if origin is str and _whole_number(value) and not any((typing.get_origin(k) or k) in (int, float) for k in kinds):
            return str(value)  # data.split=2014: YAML reads a number, the setting names something
        if origin is dict and isinstance(value, Mapping):
            item = args[1] if args else Any
            return {name: coerce(v, item, _join(key, name), source) for name, v in value.items()}
        if origin is list and isinstance(value, list | tuple):
            item = args[0] if args else Any
            return [coerce(v, item, f"{key}[{n}]", source) for n, v in enumerate(value)]
    raise ConfigError(f"{source}: {key} must be {expect or _describe(annotation)}, got {shown(value)}")


def from_dict(kind: type[T], values: Mapping[str, Any] | T | None, key: str = "", source: str = "config") -> T:
    """``kind`` built from ``values`` (a config file's mapping, or a dict from Python code): missing keys
    take their defaults; an unknown key, a value of the wrong type or one the dataclass refuses is a
    :class:`ConfigError` naming ``source`` and the key. An instance of ``kind`` is returned as it is."""
    if isinstance(values, kind):
        return values
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: {key or 'the top level'} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    for name in values:
        if name not in fields:
            raise ConfigError(f"{source}: unknown config key {shown(_join(key, name))}; known keys here: "
                              f"{', '.join(fields)}")
    hints = _hints(kind)
    typed = {}
    for name, value in values.items():
        metadata = fields[name].metadata
        typed[name] = coerce(value, hints[name], _join(key, name), source, metadata.get(CHOICES), metadata.get(EXPECT))
        if metadata.get(CHECK):
            typed[name] = metadata[CHECK](typed[name], _join(key, name), source)
    try:
        return kind(**typed)
    except ConfigError:
        raise
    except ValueError as e:  # the dataclass's own checks; a message that starts with a field's name gets its key
        message = str(e)
        if len(message) > 2 * MAX_SHOWN:  # a dataclass check quotes the value it refuses: keep the line short
            message = message[: 2 * MAX_SHOWN - 3] + "..."
        named = message.split(" ", 1)[0].split(":", 1)[0] in fields
        where = f"{key}." if key and named else f"{key}: " if key else ""
        raise ConfigError(f"{source}: {where}{message}") from None


def to_dict(settings: Any) -> dict[str, Any]:
    """The settings as plain data (what a YAML file would hold)."""
    return dataclasses.asdict(settings)


class _Dumper(yaml.SafeDumper):
    """Quotes strings such as "1e-4" that the config reader would otherwise take for floats."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_RESOLVER, list("-+0123456789."))


def to_yaml(settings: Any) -> str:
    """The resolved settings (or their :func:`to_dict`, trimmed) as YAML, every key in schema order; :func:`load`
    reads it back as equal settings."""
    values = settings if isinstance(settings, Mapping) else to_dict(settings)
    return yaml.dump(values, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _kind_at(kind: Any, path: list[str]) -> Any:
    """The annotation of the setting at ``path`` below ``kind`` (None: past a free-form mapping's values)."""
    for part in path:
        kinds = [k for k in _members(kind) if k is not type(None)]
        kind = kinds[0] if len(kinds) == 1 else None
        if dataclasses.is_dataclass(kind):
            kind = _hints(kind)[part]
        elif (typing.get_origin(kind) or kind) is dict:
            args = typing.get_args(kind)
            kind = args[1] if args else Any
        else:
            return None
    return kind


def keys_at(kind: type, path: list[str]) -> list[str] | None:
    """The keys a config may hold at ``path`` (``["train"]``: every TrainConfig field); None: any key
    (a free-form mapping such as ``model.overrides``, checked by the section itself)."""
    here = [k for k in _members(_kind_at(kind, path)) if k is not type(None)]
    if len(here) == 1 and dataclasses.is_dataclass(here[0]):
        return [f.name for f in dataclasses.fields(here[0])]
    return None


def override(config: dict, text: str, kind: type, source: str = "config") -> None:
    """Apply one ``dotted.key=value`` to a config file's mapping, for any field of ``kind``'s schema."""
    path, value = parse_override(text)
    for depth in range(1, len(path)):
        if path[depth - 1] not in (keys_at(kind, path[: depth - 1]) or ()):
            break  # an unknown key: set_dotted names it
        if keys_at(kind, path[:depth]) is None:  # a free-form mapping: the rest is one key, dots and all
            path = path[:depth] + [".".join(path[depth:])]  # train.lr_multipliers.interbert.text_stream.*=0.1
            break
    set_dotted(config, path, value, text, source, lambda prefix, node: keys_at(kind, prefix))


def load(kind: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
    """A YAML config file (a path, or a shipped config's name) with ``key=value`` overrides, as ``kind``."""
    path, config = read_config(path)
    for text in overrides:
        override(config, text, kind, str(path))
    return from_dict(kind, config, source=str(path))


def dotted_keys(kind: type, prefix: str = "") -> list[str]:
    """Every setting of ``kind`` as a dotted key (a free-form mapping as ``key.*``), for ``--help``."""
    keys = []
    for f in dataclasses.fields(kind):
        key, hint = _join(prefix, f.name), _hints(kind)[f.name]
        nested = [k for k in _members(hint) if k is not type(None)]
        if len(nested) == 1 and dataclasses.is_dataclass(nested[0]):
            keys += dotted_keys(nested[0], key)
        else:
            keys.append(key + (".*" if (typing.get_origin(hint) or hint) is dict else ""))
    return keys
