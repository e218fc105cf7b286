"""Document sources, all read through one loader: `datasets.load_dataset(..., streaming=True)`.

Three kinds of source reduce to the same call:
  * C4 on the Hub (`allenai/c4`) or a local directory laid out exactly like it: the base path changes,
    the `data_files` patterns do not, so the Hub path is exercised by tests on local files;
  * users' own json / json.gz / parquet / text files, with a language column or one directory per
    language;
  * the offline sample corpus, which `data_prep.sample_corpus` writes out in C4 layout and which is
    then read as a local C4 directory.
Streaming means a small build reads only the first documents of the first shard files it names.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets

C4_HUB_REPO = "allenai/c4"
C4_LANGUAGES = ("de", "en", "es", "fr", "it")
C4_ENGLISH_VARIANTS = ("en", "multilingual")
LOCAL_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".txt.gz": "text",
}
TEXT_SAMPLE_BY = ("document", "paragraph", "line")


@dataclass(frozen=True)
class C4Source:
    """C4 per language. `path`: Hub dataset id or a local directory in the Hub's layout.

    num_files: read the first `num_files` shard files of each language (None: all of them).
    english: "en" reads the English C4 (`en/c4-train.*`), "multilingual" the mC4 `c4-en` files.
    data_files: explicit patterns per language, relative to `path`, overriding the defaults.
    """

    path: str = C4_HUB_REPO
    num_files: int | None = 1
    english: str = "en"
    data_files: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.english not in C4_ENGLISH_VARIANTS:
            raise ValueError(f"c4_english must be one of {C4_ENGLISH_VARIANTS}, got {self.english!r}")
        if self.num_files is not None and self.num_files < 1:
            raise ValueError(f"c4_num_files must be >= 1 or null (all files), got {self.num_files}")

    @property
    def is_local(self) -> bool:
        """A local directory (existing, or spelled as a path) rather than a Hub dataset id."""
        path = self.path
        return os.path.isdir(os.path.expanduser(path)) or path.startswith(("/", ".", "~"))

    def patterns(self, lang: str) -> list[str]:
        """data_files patterns for one language, e.g. `multilingual/c4-de.tfrecord-00000-of-*.json.gz`.

        The shard total (`-of-02048`) differs per language and between the Hub and a local copy, so
        it is left as a wildcard; the shard index is spelled out so nothing else is listed as data.
        """
        if lang in self.data_files:
            patterns = self.data_files[lang]
            return [patterns] if isinstance(patterns, str) else list(patterns)
        if lang == "en" and self.english == "en":
            stem = "en/c4-train.{index}-of-*.json.gz"
        else:
            stem = f"multilingual/c4-{lang}.tfrecord-{{index}}-of-*.json.gz"
        if self.num_files is None:
            return [stem.format(index="[0-9][0-9][0-9][0-9][0-9]")]
        return [stem.format(index=f"{i:05d}") for i in range(self.num_files)]


@dataclass(frozen=True)
class LocalSource:
    """Users' own files.

    path: with `language_column`, a file, a glob or a directory (searched recursively); without
    it, a directory holding one sub-directory per language code (`<path>/de/...`, `<path>/fr/...`).
    format: json, parquet or text; inferred from the file extensions when None.
    text_column: the column holding the document text (text files always give "text").
    sample_by: for text files, what one document is: a whole file, a blank-line-separated
    paragraph, or a line.
    """

    path: str
    format: str | None = None
    text_column: str = "text"
    language_column: str | None = None
    sample_by: str = "paragraph"

    def __post_init__(self) -> None:
        formats = sorted(set(LOCAL_FORMATS.values()))
        if self.format is not None and self.format not in formats:
            raise ValueError(f"local_format must be one of {formats} or null, got {self.format!r}")
        if self.sample_by not in TEXT_SAMPLE_BY:
            raise ValueError(f"local_sample_by must be one of {TEXT_SAMPLE_BY}, got {self.sample_by!r}")

    def files(self, lang: str) -> list[str]:
        """The data files for `lang`; raises FileNotFoundError / ValueError naming what is wrong."""
        if self.language_column is None:
            root = Path(self.path).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(
                    f"local_path {self.path!r} is not a directory; without local_language_column it must "
                    "hold one sub-directory per language (e.g. <local_path>/de/*.json.gz)"
                )
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            if not (root / lang).is_dir():
                raise FileNotFoundError(
                    f"no directory for language {lang!r} in local_path {self.path!r}; found {found}"
                )
            files = _data_files_under(root / lang)
        else:
            files = _expand(self.path)
        if not files:
            raise FileNotFoundError(
                f"no data files ({', '.join(LOCAL_FORMATS)}) found for language {lang!r} under {self.path!r}"
            )
        for f in files:
            if os.path.getsize(f) == 0:
                raise ValueError(f"local data file {f!r} is empty")
        return files

    def builder(self, files: list[str]) -> str:
        if self.format is not None:
            return self.format
        kinds = {LOCAL_FORMATS[_extension(f)] for f in files}
        if len(kinds) != 1:
            raise ValueError(f"local files mix formats {sorted(kinds)}; set local_format or separate them")
        return kinds.pop()


def open_stream(source: C4Source | LocalSource, lang: str) -> datasets.IterableDataset:
    """THE loader: one language of any source as a streaming `datasets.IterableDataset`."""
    if isinstance(source, C4Source):
        patterns = source.patterns(lang)
        if source.is_local:
            _check_local_c4(source.path, patterns, lang)
            path = str(Path(source.path).expanduser())
        else:
            path = source.path
        return datasets.load_dataset(path, data_files=patterns, split="train", streaming=True)
    files = source.files(lang)
    builder = source.builder(files)
    kwargs = {"sample_by": source.sample_by} if builder == "text" else {}
    stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    if source.language_column is not None:
        column = source.language_column
        stream = stream.filter(lambda row: _column(row, column, files) == lang)
    return stream


def iter_texts(source: C4Source | LocalSource, lang: str) -> Iterator[str]:
    """Non-empty document texts of one language, in file order, without surrounding whitespace."""
    column = source.text_column if isinstance(source, LocalSource) else "text"
    for row in open_stream(source, lang):
        text = _column(row, column, source.path)
        if isinstance(text, str) and text.strip():
            yield text.strip()


def _column(row: dict, column: str, where: object) -> object:
    if column not in row:
        raise ValueError(f"column {column!r} not found in {where}; columns are {sorted(row)}")
    return row[column]


def _check_local_c4(base: str, patterns: list[str], lang: str) -> None:
    root = Path(base).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"C4 directory {base!r} does not exist")
    for pattern in patterns:
        matches = glob.glob(str(root / pattern))
        if not matches:
            raise FileNotFoundError(
                f"no C4 files for language {lang!r} match {pattern!r} under {base!r} "
                "(expected the Hub layout, e.g. multilingual/c4-de.tfrecord-00000-of-00001.json.gz)"
            )
        for f in matches:
            if os.path.getsize(f) == 0:
                raise ValueError(f"C4 file {f!r} is empty")


def _extension(path: str) -> str:
    name = os.path.basename(path).lower()
    for ext in sorted(LOCAL_FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return ""


def _data_files_under(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and _extension(str(p)))


def _expand(path: str) -> list[str]:
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return _data_files_under(Path(expanded))
    if os.path.isfile(expanded):
        return [expanded]
    return sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f) and _extension(f))
