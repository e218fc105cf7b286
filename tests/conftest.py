"""Shared fixtures: tiny multilingual shards built through data_prep's real pipeline (local source)."""

from __future__ import annotations

import datetime
import random
import socket
from pathlib import Path

import pytest
import torch.distributed as dist

LANGUAGES = ("de", "en", "es", "fr")
_LETTERS = {"de": "aeinrstudhg", "en": "etaoinshrdl", "es": "eaosrnidlct", "fr": "esaitnrulod"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous or a store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_store() -> dist.TCPStore:
    """A master TCPStore on a free local port (the tests' rendezvous between threads)."""
    return dist.TCPStore("127.0.0.1", free_port(), None, True, timeout=datetime.timedelta(seconds=30))


def _synthetic_language(lang: str, rng: random.Random) -> list[str]:
    """Documents in a made-up language with its own vocabulary and word-order habit: learnable, and
    different per language, so per-language losses differ and fall with training."""
    letters = _LETTERS[lang]
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(60)]
    docs = []
    for _ in range(120):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            start = rng.randrange(len(words))
            sentence = [words[(start + 7 * i) % len(words)] for i in range(rng.randint(5, 9))]
            sentences.append(" ".join(sentence).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def write_corpus(root: Path, languages=LANGUAGES, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for lang in languages:
        (root / lang).mkdir(parents=True, exist_ok=True)
        (root / lang / "docs.txt").write_text("\n".join(_synthetic_language(lang, rng)) + "\n")
    return root


def build_tiny_shards(tmp: Path, num_workers: int, **overrides) -> Path:
    from data_prep.build import build_shards
    from data_prep.config import BuildConfig

    corpus = write_corpus(tmp / "corpus")
    settings = dict(
        output_dir=str(tmp / f"shards-k{num_workers}"),
        source="local",
        languages=list(LANGUAGES),
        local_path=str(corpus),
        local_format="text",
        local_sample_by="line",
        vocab_size=384,
        num_workers=num_workers,
        partition="dominant",
        p=0.8,
        seq_len=32,
        validation_fraction=0.1,
        seed=0,
    )
    config = BuildConfig(**{**settings, **overrides})
    return build_shards(config)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Shards for K=3 workers over four synthetic languages (seq_len 32, vocab 384)."""
    return build_tiny_shards(tmp_path_factory.mktemp("data"), num_workers=3)


from tests.fake_hub import fake_hub  # noqa: E402, F401  (a fake Hugging Face Hub for any test)
