"""The offline sample corpus built from scratch with apt (slow: downloads ~50 MB of Debian packages)."""

from __future__ import annotations

import shutil
import time

import pytest

from data_prep import load_shards
from data_prep.build import build_shards
from data_prep.config import load_config
from data_prep.sample_corpus import build_sample_corpus, format_stats

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt-get and dpkg-deb"),
]


def test_sample_corpus_and_demo_shards_from_scratch(tmp_path):
    start = time.perf_counter()
    stats = build_sample_corpus(tmp_path / "c4", cache_dir=tmp_path / "debian")
    corpus_seconds = time.perf_counter() - start
    print(format_stats(stats), f"\nsample corpus built from scratch in {corpus_seconds:.0f} s")
    for lang, s in stats.items():
        assert s.megabytes >= 0.5, f"{lang}: only {s.megabytes:.2f} MB"
        assert s.documents >= 500

    config = load_config(
        "data_prep/configs/sample.yaml",
        output_dir=str(tmp_path / "shards"),
        sample_cache_dir=str(tmp_path / "debian"),
        sample_corpus_dir=str(tmp_path / "c4"),
    )
    build_shards(config)
    print(f"demo shards built in {time.perf_counter() - start:.0f} s in total")
    train, validation, meta = load_shards(tmp_path / "shards", num_workers=5)
    assert meta["source"]["kind"] == "sample"
    assert sorted(validation) == ["de", "en", "es", "fr", "it"]
    assert all(len(validation[lang]) >= 50 for lang in validation)
    for k, lang in enumerate(meta["languages"]):
        counts = meta["tokens_per_worker"][f"worker_{k}"]
        share = counts[lang] / sum(counts.values())
        # p = 0.8, or more for a language with tokens to spare
        assert share == pytest.approx(0.8, abs=0.01) or share > 0.8
        assert len(train[f"worker_{k}"]) > 1000
