"""Data preparation for heloco: language-skewed non-IID worker shards from C4, local files or an
offline sample corpus of Debian documentation.

The training recipe needs two calls:
    train, validation, metadata = data_prep.load_shards(path, num_workers=K)
    path = data_prep.ensure_sample_shards("data/sample_shards", num_workers=K)   # builds once
Names are resolved lazily so `import data_prep` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BuildConfig", "build_shards", "ensure_sample_shards", "load_config", "load_shards"]

_EXPORTS = {
    "BuildConfig": "data_prep.config",
    "load_config": "data_prep.config",
    "build_shards": "data_prep.build",
    "ensure_sample_shards": "data_prep.build",
    "load_shards": "data_prep.shards",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
