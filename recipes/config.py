"""Recipe configuration: dataclasses parsed by transformers' HfArgumentParser from a YAML file, with
any key overridable on the command line (``--config recipes/configs/x.yaml --outer_lr 0.3``).

Every value is checked before any data is read or a model is built, so a typo fails in a second
with a message naming the field and the accepted values.

This module is the one to import: it puts together the fields (recipes.config_fields), reading
them from argv, YAML or a dict (recipes.config_parsing) and judging them (recipes.config_checks),
and re-exports the names of all three.
"""

from __future__ import annotations

from typing import Any

from recipes.cli import ConfigError, MissingFileError
from recipes.config_checks import network_options_set, validate
from recipes.config_fields import (
    CODEC_OPTION_DEFAULTS,
    CONFIG_CLASSES,
    DOWNLINKS,
    GROUP_PARALLELISMS,
    MODEL_SIZES,
    MODES,
    NETWORK_FIELDS,
    PRECISIONS,
    REPORTERS,
    SCHEDULES,
    SERVER_MEMORIES,
    UPLINK_CODECS,
    WEIGHTINGS,
    WORKER_WEIGHTINGS,
    DataArguments,
    DiLoCoArguments,
    ModelArguments,
    RecipeConfig,
    TrainArguments,
)
from recipes.config_parsing import check_values, load_yaml, parse_argv, parse_values

__all__ = [
    "CODEC_OPTION_DEFAULTS",
    "CONFIG_CLASSES",
    "DOWNLINKS",
    "GROUP_PARALLELISMS",
    "MODEL_SIZES",
    "MODES",
    "NETWORK_FIELDS",
    "PRECISIONS",
    "REPORTERS",
    "SCHEDULES",
    "SERVER_MEMORIES",
    "UPLINK_CODECS",
    "WEIGHTINGS",
    "WORKER_WEIGHTINGS",
    "ConfigError",
    "DataArguments",
    "DiLoCoArguments",
    "MissingFileError",
    "ModelArguments",
    "RecipeConfig",
    "TrainArguments",
    "check_values",
    "config_from_dict",
    "load_yaml",
    "network_options_set",
    "parse_config",
    "validate",
]


def parse_config(argv: list[str] | None = None) -> RecipeConfig:
    """``--config file.yaml`` sets defaults; every other ``--key value`` overrides them; the result
    validated. ``argv`` defaults to ``sys.argv[1:]``."""
    config = parse_argv(argv)
    validate(config)
    return config


def config_from_dict(values: dict[str, Any], source: str = "config") -> RecipeConfig:
    """Build and validate a config from a flat dict (what compare.py and tests use); ``source``
    names where the values came from in error messages."""
    config = parse_values(values, source)
    validate(config)
    return config
