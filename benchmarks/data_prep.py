"""Throughput of data_prep's text -> packed sequences path against raw `Tokenizer.encode_batch`.

Both run in this process on the same documents with the same trained tokenizer and the same batches;
encoders alternate batch by batch and the best of several repetitions is kept for each. The pipeline path is what
`data_prep.build` does after reading: `encode_documents` per batch (Rust batch encoding, EOS appended,
one flat numpy array), the partition to K workers, and numpy packing into seq_len rows.

    python benchmarks/data_prep.py [--max_mb 4] [--repeats 3]

Text: the offline sample corpus if it is built (or can be, with apt), otherwise generated text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

# This script is itself called data_prep.py: make `import data_prep` find the package, not this file.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from data_prep.config import BuildConfig  # noqa: E402
from data_prep.pack import pack_documents  # noqa: E402
from data_prep.partition import partition_documents  # noqa: E402
from data_prep.sample_corpus import build_sample_corpus  # noqa: E402
from data_prep.sources import C4Source, iter_texts  # noqa: E402
from data_prep.synthetic import synthetic_documents  # noqa: E402
from data_prep.tokenizer import TokenizedDocuments, encode_documents, train_tokenizer  # noqa: E402

LANGUAGES = ("de", "en", "es", "fr", "it")


def load_texts(max_bytes: int) -> tuple[list[str], np.ndarray, str]:
    """Documents interleaved across languages up to `max_bytes`, their language ids, and where from."""
    per_language = max_bytes // len(LANGUAGES)
    try:
        corpus_dir = BuildConfig().corpus_dir
        build_sample_corpus(corpus_dir, LANGUAGES)
        source = C4Source(path=str(corpus_dir), num_files=None, english="multilingual")
        streams = {lang: iter_texts(source, lang) for lang in LANGUAGES}
        origin = f"sample corpus at {corpus_dir}"
    except (RuntimeError, OSError) as error:  # no apt here: fall back to generated text
        streams = {lang: iter(synthetic_documents(lang, 20_000, seed=0)) for lang in LANGUAGES}
        origin = f"generated text ({error.__class__.__name__}: sample corpus unavailable)"
    texts, languages = [], []
    for i, lang in enumerate(LANGUAGES):
        size = 0
        for text in streams[lang]:
            texts.append(text)
            languages.append(i)
            size += len(text.encode())
            if size >= per_language:
                break
    order = np.random.default_rng(0).permutation(len(texts))  # mix languages within batches
    return [texts[i] for i in order], np.asarray(languages)[order], origin


def measure(tokenizer, texts, languages, batch_size: int, seq_len: int = 128, num_workers: int = 5) -> dict:
    """Seconds for each path over all documents. The three encoders run back to back on every batch,
    so load changes on a shared machine hit them alike; the pipeline's tail (partition and packing of
    everything) is timed once and added to its total."""
    backend = tokenizer.backend_tokenizer
    seconds = {"encode_batch": 0.0, "encode_batch_fast": 0.0, "pipeline": 0.0}
    parts = []
    for i in range(0, len(texts), batch_size):
        batch = texts[i : i + batch_size]
        t0 = time.perf_counter()
        backend.encode_batch(batch, add_special_tokens=False)
        t1 = time.perf_counter()
        backend.encode_batch_fast(batch, add_special_tokens=False)
        t2 = time.perf_counter()
        parts.append(encode_documents(tokenizer, batch))
        t3 = time.perf_counter()
        seconds["encode_batch"] += t1 - t0
        seconds["encode_batch_fast"] += t2 - t1
        seconds["pipeline"] += t3 - t2
    t0 = time.perf_counter()
    docs = TokenizedDocuments.concatenate(parts)
    part = partition_documents(
        languages, docs.lengths, len(LANGUAGES), num_workers, "dominant", p=0.8, seed=0
    )
    rows = sum(
        len(pack_documents(docs, order, seq_len, languages, len(LANGUAGES)).sequences)
        for order in part.workers
    )
    seconds["pipeline"] += time.perf_counter() - t0
    assert rows > 0
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_mb", type=float, default=4.0, help="MB of text to tokenize")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=BuildConfig.batch_size)
    args = parser.parse_args()

    texts, languages, origin = load_texts(int(args.max_mb * 1e6))
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    tokenizer = train_tokenizer(texts, vocab_size=8192, show_progress=False)
    runs = [measure(tokenizer, texts, languages, args.batch_size) for _ in range(args.repeats)]
    pipeline_s, raw_s, raw_fast_s = (
        min(r[k] for r in runs) for k in ("pipeline", "encode_batch", "encode_batch_fast")
    )
    ratio = raw_s / pipeline_s
    print(f"# {megabytes:.2f} MB, {len(texts)} documents from {origin}; best of {args.repeats}")
    print(
        f"data_prep: pipeline/encode_batch = {ratio:.2f} "
        f"(pipeline {megabytes / pipeline_s:.2f} MB/s, encode_batch {megabytes / raw_s:.2f} MB/s)"
    )
    print(
        f"data_prep: pipeline/encode_batch_fast = {raw_fast_s / pipeline_s:.2f} "
        f"(encode_batch_fast {megabytes / raw_fast_s:.2f} MB/s; the pipeline encodes with it: no offsets needed)"
    )


if __name__ == "__main__":
    main()
