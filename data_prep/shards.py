"""The on-disk shard layout, written atomically, and `load_shards`, the training recipe's entry point.

    <out>/train/          DatasetDict: worker_0 ... worker_{K-1}, column input_ids (seq_len int32)
    <out>/validation/     DatasetDict: one split per language code, same column
    <out>/tokenizer/      a transformers tokenizer directory
    <out>/metadata.json   see `build.build_shards` (heloco_data_version: 1)

The build writes everything into a temporary sibling directory and renames it into place at the end,
so an interrupted build never leaves something a training run could mistake for complete shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, load_from_disk

from heloco import checkpoint
from recipes.cli import ConfigError

DATA_VERSION = 1
METADATA_FILE = "metadata.json"
BUILD_HINT = "python -m data_prep.build --config data_prep/configs/sample.yaml --output_dir {path}"


def worker_split(k: int) -> str:
    return f"worker_{k}"


def sequences_to_dataset(sequences: np.ndarray) -> Dataset:
    """(n, seq_len) int array -> Dataset with one fixed-length `input_ids` list column (zero-copy arrow)."""
    sequences = np.ascontiguousarray(sequences, dtype=np.int32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(sequences.reshape(-1)), sequences.shape[1])
    return Dataset(pa.table({"input_ids": column}))


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse to build over an existing, non-empty output directory unless `overwrite`."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {str(out)!r} already exists and is not empty; pass --overwrite (overwrite: true) "
            "to replace it, or choose another output_dir"
        )
    return out


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory next to `out_dir`; on success it replaces `out_dir` in one rename
    (heloco's one ``atomic_directory``, after the overwrite check).

    On error the temporary directory is removed and `out_dir` is left untouched.
    """
    out = check_output_dir(out_dir, overwrite)
    with checkpoint.atomic_directory(out) as tmp:
        yield tmp
        check_output_dir(out, overwrite)  # it may have appeared while we were building


def save_shards(
    directory: Path,
    train: Mapping[str, np.ndarray],
    validation: Mapping[str, np.ndarray],
    tokenizer: Any,
    metadata: Mapping[str, Any],
) -> None:
    """Write the four parts of the layout into `directory` (normally the temporary build directory)."""
    DatasetDict({name: sequences_to_dataset(s) for name, s in train.items()}).save_to_disk(
        str(directory / "train")
    )
    DatasetDict({name: sequences_to_dataset(s) for name, s in validation.items()}).save_to_disk(
        str(directory / "validation")
    )
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """metadata.json of a shard directory; FileNotFoundError with the build command if absent."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"no shards at {str(root)!r}; build them with `{BUILD_HINT.format(path=root)}`"
        )
    meta_file = root / METADATA_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{str(root)!r} is not a complete shard directory ({METADATA_FILE} missing); rebuild it with "
            f"`{BUILD_HINT.format(path=root)} --overwrite`"
        )
    metadata = json.loads(meta_file.read_text())
    version = metadata.get("heloco_data_version")
    if version != DATA_VERSION:
        raise ValueError(
            f"shards at {str(root)!r} have heloco_data_version {version!r}; this code reads version "
            f"{DATA_VERSION}; rebuild them with `{BUILD_HINT.format(path=root)} --overwrite`"
        )
    return metadata


def load_shards(path: str | Path, num_workers: int | None = None) -> tuple[DatasetDict, DatasetDict, dict]:
    """Load and validate shards built by `data_prep.build`: (train, validation, metadata).

    train has splits worker_0 ... worker_{K-1}; validation one split per language; both have the
    column input_ids. metadata is metadata.json plus `tokenizer_path` (the tokenizer directory here).
    Raises FileNotFoundError when the directory or one of its parts is missing, ValueError when
    `num_workers` is given and differs from the K the shards were built for.
    """
    root = Path(path).expanduser()
    metadata = read_metadata(root)
    built_for = metadata["num_workers"]
    if num_workers is not None and num_workers != built_for:
        raise ConfigError(
            f"num_workers={num_workers} was requested but the shards at {str(root)!r} were built for "
            f"K={built_for} workers; rebuild them with `{BUILD_HINT.format(path=root)} --num_workers "
            f"{num_workers} --overwrite` or set num_workers to {built_for}"
        )
    for part in ("train", "validation", "tokenizer"):
        if not (root / part).is_dir():
            raise FileNotFoundError(
                f"shard directory {str(root)!r} lacks {part}/; rebuild it with --overwrite"
            )
    train = load_from_disk(str(root / "train"))
    validation = load_from_disk(str(root / "validation"))
    expected = [worker_split(k) for k in range(built_for)]
    if sorted(train.keys()) != sorted(expected):
        raise ValueError(f"train splits {sorted(train.keys())} of {str(root)!r} do not match K={built_for}")
    if sorted(validation.keys()) != sorted(metadata["languages"]):
        raise ValueError(
            f"validation splits {sorted(validation.keys())} of {str(root)!r} do not match languages "
            f"{metadata['languages']}"
        )
    metadata["tokenizer_path"] = str((root / "tokenizer").absolute())
    return train, validation, metadata


def format_histogram(tokens_per_worker: Mapping[str, Mapping[str, int]], languages: list[str]) -> str:
    """Per-worker language histogram in tokens, with each language's share of the worker."""
    header = f"{'worker':<10}" + "".join(f"{lang:>16}" for lang in languages) + f"{'total':>12}"
    lines = [header]
    for worker, counts in tokens_per_worker.items():
        total = sum(counts.values())
        cells = "".join(
            f"{counts.get(lang, 0):>9} ({100 * counts.get(lang, 0) / max(total, 1):3.0f}%)"
            for lang in languages
        )
        lines.append(f"{worker:<10}{cells}{total:>12}")
    return "\n".join(lines)
