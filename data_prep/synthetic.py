"""Small generated corpora, for tests and for benchmarks on machines without the sample corpus.

Documents are strings of each language's function words and invented words, so the language check
recognises them; `write_c4_layout` writes them exactly like the Hub's C4 files.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from data_prep.langcheck import STOPWORDS

_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ren",
    "sto",
    "var",
    "tel",
    "non",
    "bra",
    "ze",
    "qui",
    "dor",
    "fen",
    "ul",
    "ap",
)


def synthetic_documents(
    lang: str, n: int, *, seed: int = 0, min_words: int = 20, max_words: int = 120
) -> list[str]:
    """`n` documents of sentences mixing `lang`'s function words with invented content words."""
    rng = np.random.default_rng([seed, sum(map(ord, lang))])
    function_words = sorted(w for w in STOPWORDS[lang] if not w.endswith("'"))
    docs = []
    for _ in range(n):
        words = []
        for i in range(int(rng.integers(min_words, max_words + 1))):
            if i % 2 == 0:
                words.append(function_words[int(rng.integers(len(function_words)))])
            else:
                parts = rng.integers(len(_SYLLABLES), size=int(rng.integers(1, 4)))
                words.append("".join(_SYLLABLES[j] for j in parts))
        sentences = [" ".join(words[i : i + 10]).capitalize() + "." for i in range(0, len(words), 10)]
        docs.append(" ".join(sentences))
    return docs


def write_c4_layout(
    root: str | Path,
    documents: Mapping[str, Sequence[str]],
    *,
    num_files: int = 1,
    english: str = "multilingual",
) -> dict[str, list[Path]]:
    """Write documents as C4 json.gz shards: `multilingual/c4-<lang>.tfrecord-NNNNN-of-MMMMM.json.gz`
    (or `en/c4-train.NNNNN-of-MMMMM.json.gz` for English with english="en"), split round-robin."""
    root = Path(root)
    written: dict[str, list[Path]] = {}
    for lang, docs in documents.items():
        paths = []
        for i in range(num_files):
            if lang == "en" and english == "en":
                path = root / "en" / f"c4-train.{i:05d}-of-{num_files:05d}.json.gz"
            else:
                path = root / "multilingual" / f"c4-{lang}.tfrecord-{i:05d}-of-{num_files:05d}.json.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt", encoding="utf-8") as f:
                for j, text in enumerate(docs[i::num_files]):
                    record = {
                        "text": text,
                        "timestamp": "2019-04-25T12:57:54Z",
                        "url": f"https://example.org/{lang}/{i}/{j}",
                    }
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            paths.append(path)
        written[lang] = paths
    return written
