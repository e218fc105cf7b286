"""Reading a recipe config: the command line (HfArgumentParser over the field dataclasses) and YAML
files, every value converted to its field's type or refused with a ConfigError naming the key.

What comes out is typed but not yet validated: recipes.config_checks judges the values.
"""

from __future__ import annotations

import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

from recipes.cli import ConfigError, MissingFileError
from recipes.config_fields import CONFIG_CLASSES, RecipeConfig


def _all_field_names() -> set[str]:
    return {f for cls in CONFIG_CLASSES for f in cls.__dataclass_fields__}


def _field_types() -> dict[str, Any]:
    """Field name → its annotation, resolved (``int | None``, ``list[float]``, ...)."""
    return {name: hint for cls in CONFIG_CLASSES for name, hint in typing.get_type_hints(cls).items()}


class _ErrorRaisingParser(HfArgumentParser):
    """HfArgumentParser whose usage errors raise ``ConfigError`` (one line) instead of printing the
    whole usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help for every option)")


def parse_argv(argv: list[str] | None = None) -> RecipeConfig:
    """``--config file.yaml`` sets defaults; every other ``--key value`` overrides them. Not
    validated (recipes.config.parse_config is this, then ``validate``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _ErrorRaisingParser(CONFIG_CLASSES)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file path")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    if config_path is not None:
        values = load_yaml(config_path)
        parser.set_defaults(**values)
    model, data, diloco, train, extra = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True
    )
    if extra:
        raise ConfigError(f"unknown command-line arguments {extra} (see --help for every option)")
    return RecipeConfig(model, data, diloco, train)


def parse_values(values: dict[str, Any], source: str = "config") -> RecipeConfig:
    """A config from a flat dict, each value checked against its field's type; ``source`` names
    where the values came from in error messages. Not validated (recipes.config.config_from_dict is
    this, then ``validate``)."""
    values = check_values(values, source)
    parts = HfArgumentParser(CONFIG_CLASSES).parse_dict(values)
    return RecipeConfig(*parts)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe config file's values, each checked against its field's type (see ``check_values``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if values is None:
        raise ConfigError(f"{path} is empty; a recipe config is a mapping of key: value")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe config must be a mapping of key: value")
    return check_values(values, str(path))


def check_values(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Unknown keys refused and every value checked against its field's type, naming ``source``
    and the key. Numbers may be written in exponent form (``1e5``, ``2e-3``: YAML reads those as
    strings); an integer field takes ``1e5`` but not ``1.5``. Returns the converted values."""
    unknown = sorted(set(values) - _all_field_names())
    if unknown:
        raise ConfigError(f"{source}: unknown config keys {unknown}")
    types_ = _field_types()
    return {key: _convert(value, types_[key], f"{source}: {key}") for key, value in values.items()}


def _type_error(where: str, expected: str, value: Any) -> NoReturn:
    raise ConfigError(f"{where} must be {expected}, got {value!r}")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field type ``hint`` wants it, or ConfigError naming ``where``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list | tuple):
            _type_error(where, f"a list of {args[0].__name__} (e.g. [1.0, 0.5])", value)
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            _type_error(where, "true or false", value)
        return value
    if hint is str:
        if isinstance(value, os.PathLike):  # a Path from code calling config_from_dict
            return os.fspath(value)
        if not isinstance(value, str):
            _type_error(where, "a string (quote it in YAML)", value)
        return value
    number = _as_number(value)
    if hint is float:
        if number is None:
            _type_error(where, "a number (e.g. 0.7 or 2e-3)", value)
        return float(number)
    if hint is int:
        if number is None or not float(number).is_integer():
            _type_error(where, "an integer (e.g. 400000 or 4e5)", value)
        return int(number)
    raise TypeError(f"{where}: no conversion for the field type {hint!r}")  # a new field type: extend this


def _as_number(value: Any) -> int | float | None:
    """An int or float as given, a string in exponent or decimal form converted; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None
