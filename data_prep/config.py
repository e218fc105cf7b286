"""Build parameters: one dataclass, read from YAML and overridden by command-line flags, validated up front.

Every check here runs before anything is downloaded, tokenized or written, and names the field and
the values it accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_prep.partition import validate_partition_args
from data_prep.sample_corpus import SAMPLE_LANGUAGES, default_cache_dir
from data_prep.sources import C4_ENGLISH_VARIANTS, C4_LANGUAGES, LOCAL_FORMATS, TEXT_SAMPLE_BY
from recipes.cli import ConfigError, MissingFileError

SOURCES = ("sample", "c4", "local")
CONFIG_DIR = Path(__file__).parent / "configs"
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]+)*$")
# Fields that do not change the data built (where it goes, caches, publishing).
_NON_DATA_FIELDS = frozenset(
    {
        "output_dir",
        "overwrite",
        "push_to_hub",
        "hub_private",
        "sample_cache_dir",
        "sample_corpus_dir",
        "apt_update",
    }
)


@dataclass
class BuildConfig:
    """Everything `python -m data_prep.build` needs. See data_prep/configs/*.yaml for annotated examples."""

    output_dir: str = "data/shards"
    overwrite: bool = False
    source: str = "sample"
    languages: list[str] = field(default_factory=lambda: list(SAMPLE_LANGUAGES))
    # source: c4 (Hub id or a local directory in the same layout)
    c4_path: str = "allenai/c4"
    c4_num_files: int | None = 1
    c4_english: str = "en"
    c4_data_files: dict[str, Any] = field(default_factory=dict)
    # source: local
    local_path: str | None = None
    local_format: str | None = None
    local_text_column: str = "text"
    local_language_column: str | None = None
    local_sample_by: str = "paragraph"
    # source: sample
    sample_cache_dir: str = field(default_factory=default_cache_dir)  # $HELOCO_CACHE_DIR/debian
    sample_corpus_dir: str | None = None
    sample_packages: dict[str, list[str]] | None = None
    apt_update: bool = True
    # budgets, per language (an int for all languages, or {lang: int}); null = everything
    max_documents: int | dict[str, int] | None = None
    max_tokens: int | dict[str, int] | None = None
    validation_fraction: float = 0.05
    # tokenizer: null trains a byte-level BPE; otherwise a Hub name or a local directory
    tokenizer: str | None = None
    vocab_size: int = 8192
    tokenizer_train_bytes: int = 200_000_000
    # partition and packing
    num_workers: int = 5
    partition: str = "dominant"
    p: float = 0.8
    alpha: float = 1.0
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 1000
    # publishing
    push_to_hub: str | None = None
    hub_private: bool = False

    def validate(self) -> BuildConfig:
        """Raise ValueError naming the field and the accepted values; returns self. The checks run in
        a fixed order (source, languages, source options, budgets, tokenizer, partition and packing,
        sample packages), so a config with several faults always reports the same one first."""
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {SOURCES}, got {self.source!r}")
        self._check_languages()
        self._check_source_options()
        self._check_budgets()
        self._check_tokenizer_options()
        self._check_partition_and_packing()
        self._check_sample_packages()
        return self

    def _check_languages(self) -> None:
        """A non-empty list of distinct codes, each one the source knows (sample and c4 have fixed sets)."""
        if isinstance(self.languages, str) or not self.languages:
            raise ConfigError(f"languages must be a non-empty list of language codes, got {self.languages!r}")
        if len(set(self.languages)) != len(self.languages):
            raise ConfigError(f"languages contains duplicates: {self.languages}")
        accepted = {"sample": SAMPLE_LANGUAGES, "c4": C4_LANGUAGES}.get(self.source)
        for lang in self.languages:
            if accepted is not None and lang not in accepted:
                raise ConfigError(
                    f"languages: unknown language {lang!r} for source {self.source!r}; accepted: {list(accepted)}"
                )
            if not isinstance(lang, str) or not _LANGUAGE_CODE.match(lang):
                raise ConfigError(f"languages: {lang!r} is not a language code like 'de' or 'pt-BR'")

    def _check_source_options(self) -> None:
        """The c4 and local fields, checked whatever the source (a bad value is a typo either way)."""
        if self.source == "local" and not self.local_path:
            raise ConfigError(
                "local_path must be set for source 'local' (a directory per language, or files)"
            )
        if self.c4_english not in C4_ENGLISH_VARIANTS:
            raise ConfigError(f"c4_english must be one of {C4_ENGLISH_VARIANTS}, got {self.c4_english!r}")
        if self.c4_num_files is not None and (not _is_int(self.c4_num_files) or self.c4_num_files < 1):
            raise ConfigError(
                f"c4_num_files must be an integer >= 1 or null (all files), got {self.c4_num_files!r}"
            )
        formats = sorted(set(LOCAL_FORMATS.values()))
        if self.local_format is not None and self.local_format not in formats:
            raise ConfigError(f"local_format must be one of {formats} or null, got {self.local_format!r}")
        if self.local_sample_by not in TEXT_SAMPLE_BY:
            raise ConfigError(
                f"local_sample_by must be one of {TEXT_SAMPLE_BY}, got {self.local_sample_by!r}"
            )

    def _check_budgets(self) -> None:
        """max_documents / max_tokens: a valid shape, and per-language budgets only for known languages."""
        for name in ("max_documents", "max_tokens"):
            self.budget(name, self.languages[0])  # validates the shape for every language
            value = getattr(self, name)
            if isinstance(value, dict):
                extra = sorted(set(value) - set(self.languages))
                if extra:
                    raise ConfigError(
                        f"{name} names languages {extra} that are not in languages {self.languages}"
                    )

    def _check_tokenizer_options(self) -> None:
        """The validation split and the tokenizer's training sizes."""
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if not _is_int(self.vocab_size) or self.vocab_size < 257:
            raise ConfigError(
                f"vocab_size must be an integer >= 257 (256 bytes + EOS), got {self.vocab_size!r}"
            )
        if not _is_int(self.tokenizer_train_bytes) or self.tokenizer_train_bytes < 1:
            raise ConfigError(
                f"tokenizer_train_bytes must be an integer >= 1, got {self.tokenizer_train_bytes!r}"
            )

    def _check_partition_and_packing(self) -> None:
        """The partition's own checks, then sequence length, seed and packing batch size."""
        validate_partition_args(self.partition, self.num_workers, self.p, self.alpha)
        if not _is_int(self.seq_len) or self.seq_len < 2:
            raise ConfigError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")

    def _check_sample_packages(self) -> None:
        """Custom sample packages must cover every language: one without packages would get no text."""
        if self.sample_packages is not None:
            missing = sorted(set(self.languages) - set(self.sample_packages))
            if missing:
                raise ConfigError(f"sample_packages gives no packages for languages {missing}")

    def budget(self, name: str, lang: str) -> int | None:
        """max_documents / max_tokens for one language (None = no limit)."""
        value = getattr(self, name)
        if isinstance(value, dict):
            value = value.get(lang)
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(
                f"{name} must be null, an integer >= 1, or {{language: integer >= 1}}; got {value!r}"
            )
        return value

    def data_fields(self) -> dict[str, Any]:
        """The fields that determine the shards' content (compared when deciding to reuse shards)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NON_DATA_FIELDS}

    @property
    def corpus_dir(self) -> Path:
        """Where the sample corpus is written in C4 layout."""
        if self.sample_corpus_dir:
            return Path(self.sample_corpus_dir).expanduser()
        return Path(self.sample_cache_dir).expanduser().parent / "sample_c4"


def load_config(path: str | Path | None = None, **overrides: Any) -> BuildConfig:
    """BuildConfig from a YAML file (optional) with keyword overrides; unknown keys are an error."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"config file {str(path)!r} not found; examples are in {CONFIG_DIR}")
        values = yaml.safe_load(path.read_text())
        if values is None:
            raise ConfigError(f"config file {str(path)!r} is empty; examples are in {CONFIG_DIR}")
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value")
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config fields {unknown}; accepted fields: {sorted(known)}")
    return BuildConfig(**values).validate()


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    """`--config FILE` plus one `--<field> VALUE` flag per BuildConfig field (values parsed as YAML)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.build",
        description="Build language-skewed non-IID worker shards (see data_prep/configs/*.yaml).",
    )
    parser.add_argument("--config", help="YAML file of BuildConfig fields; flags override it")
    for f in dataclasses.fields(BuildConfig):
        if f.type == "bool":
            parser.add_argument(
                f"--{f.name}", nargs="?", const="true", default=None, help=f"(bool) default {f.default}"
            )
        else:
            parser.add_argument(f"--{f.name}", default=None, help=f"({f.type})")
    args = parser.parse_args(argv)
    overrides = {}
    for f in dataclasses.fields(BuildConfig):
        raw = getattr(args, f.name)
        if raw is None:
            continue
        value = yaml.safe_load(raw)
        if f.name == "languages" and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if f.type.startswith("str") and value is not None:
            value = raw  # keep strings literal: "--output_dir 007" is a path, not the number 7
        overrides[f.name] = value
    return load_config(args.config, **overrides)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
