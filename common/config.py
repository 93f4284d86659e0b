"""Run configuration: a dataclass of settings, filled from a YAML file and command-line overrides.

Every field of the dataclass becomes a ``--field`` option (``--no-field`` for booleans). Precedence:
dataclass defaults < YAML file (``--config``) < command line. Unknown YAML keys, a key given twice in one
mapping and values of the wrong type are errors naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.rules import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``(inner type, optional)`` of ``X | None`` style annotations; lists return ``list[X]`` unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    base, optional = _base_type(annotation)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{name} must not be empty")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v.strip() if isinstance(v, str) else v, item) for v in items if v != ""]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    try:
        if base in (int, float) and isinstance(value, bool):
            raise ValueError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if base is str and not isinstance(value, str):
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be of type {getattr(base, '__name__', base)}, got {value!r}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives the same key twice (YAML would keep the last one)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:  # an unhashable key: the default constructor names it
            continue
        if first != key_node.start_mark.line + 1:
            raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice (first on line {first})",
                                                    key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)

BASE_KEY = "base"
"""A config file's ``base: other.yaml`` (relative to the file) loads that file first; this file's keys win."""


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is an empty mapping) over that of its ``base`` file, if it
    names one (:data:`BASE_KEY`); every problem, a cycle of bases included, is a ``ConfigError``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config: {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"--config: config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"--config: config file {path} is not UTF-8 text (byte {error.start}: "
                          f"{error.reason})") from None
    except OSError as error:
        raise ConfigError(f"--config: cannot read config file {path} ({error.strerror or error})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"--config: {where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: config file {path} must hold a mapping of settings, got {type(data).__name__}")
    if any(not isinstance(key, str) for key in data):
        raise ConfigError(f"--config: config file {path}: every key must be a setting name, got {list(data)}")
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ConfigError(f"--config: {path}: {BASE_KEY} must name a YAML file, got {base!r}")
    base_path = (path.parent / base).resolve()
    chain = (*_chain, path.resolve())
    if base_path in chain:
        raise ConfigError(f"--config: {path}: {BASE_KEY} {base} makes a cycle ({' -> '.join(map(str, chain))})")
    if not base_path.is_file():
        raise ConfigError(f"--config: {path}: {BASE_KEY} file {base_path} does not exist")
    return {**load_yaml(base_path, chain), **data}


def _default_text(field: dataclasses.Field) -> str:
    """The field's default as ``--help`` shows it (lists from their factory, e.g. ``['fp', 'rtn']``)."""
    if field.default_factory is not dataclasses.MISSING:
        return repr(field.default_factory())
    if field.default is dataclasses.MISSING:
        return "required"
    return repr(field.default)


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--config`` and one option per dataclass field (all defaulting to unset)."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help="YAML file of settings (the command line overrides it)")
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):
        base, _ = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        if base is bool:
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(f"--{field.name}", help=f"{help_text} (default: {_default_text(field)})".strip())
    return parser


def make_config(cls: type[T], overrides: dict[str, Any] | None = None, yaml_path: str | Path | None = None) -> T:
    """Instantiate ``cls`` from defaults, a YAML file and ``overrides`` (later wins), with type checks."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    values.update(overrides or {})
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = {name: difflib.get_close_matches(name, sorted(known), n=1) for name in unknown}
        guesses = "; ".join(f"{name!r}: did you mean {close[0]!r}?" for name, close in hints.items() if close)
        raise ConfigError(f"unknown setting(s) {unknown}" + (f" ({guesses})" if guesses else "")
                          + f"; allowed: {sorted(known)}")
    config = cls(**{name: _coerce(name, value, hints[name]) for name, value in values.items()})
    object.__setattr__(config, _GIVEN, frozenset(values))
    return config


_GIVEN = "_given_settings"


def given_settings(config: Any) -> frozenset[str]:
    """The names of the settings the user wrote (in the YAML file or on the command line) for ``config``; for a
    configuration made in Python, those whose value is not the field's default."""
    given = getattr(config, _GIVEN, None)
    if given is not None:
        return given
    return frozenset(field.name for field in dataclasses.fields(config)
                     if getattr(config, field.name) != _default_value(field))


def _default_value(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def parse_config(cls: type[T], argv: list[str] | None, description: str) -> T:
    """Parse ``argv`` into ``cls`` (see the module docstring)."""
    args = vars(build_parser(cls, description).parse_args(argv))
    yaml_path = args.pop("config", None)
    return make_config(cls, args, yaml_path)
