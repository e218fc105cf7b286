"""Build worker shards: source -> tokenizer -> partition to K workers -> pack -> save (atomically).

    python -m data_prep.build --config data_prep/configs/sample.yaml [--num_workers 8 --p 0.9 ...]

Any config field can be given as a flag (values are parsed as YAML: `--max_tokens '{de: 1000000}'`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from data_prep.config import CONFIG_DIR, BuildConfig, load_config, parse_args
from data_prep.corpus import DocumentReader, tokenize_language
from data_prep.pack import pack_documents
from data_prep.partition import partition_documents
from data_prep.sample_corpus import build_sample_corpus, corpus_digest, format_stats
from data_prep.shards import (
    DATA_VERSION,
    atomic_directory,
    check_output_dir,
    format_histogram,
    read_metadata,
    save_shards,
    worker_split,
)
from data_prep.sources import C4Source, LocalSource, iter_texts
from data_prep.tokenizer import TokenizedDocuments, load_tokenizer, train_tokenizer
from recipes.cli import ConfigError, run_cli

SAMPLE_CONFIG = CONFIG_DIR / "sample.yaml"


def resolve_source(config: BuildConfig) -> tuple[C4Source | LocalSource, dict[str, Any]]:
    """The loader's source for this config, plus its description for the metadata.

    source 'sample' first builds (or reuses) the Debian corpus in C4 layout, then reads it as C4.
    """
    if config.source == "local":
        source = LocalSource(
            path=config.local_path,
            format=config.local_format,
            text_column=config.local_text_column,
            language_column=config.local_language_column,
            sample_by=config.local_sample_by,
        )
        return source, {
            "kind": "local",
            "path": config.local_path,
            "language_column": config.local_language_column,
        }
    if config.source == "c4":
        source = C4Source(
            path=config.c4_path,
            num_files=config.c4_num_files,
            english=config.c4_english,
            data_files=config.c4_data_files,
        )
        files = {lang: source.patterns(lang) for lang in config.languages}
        return source, {"kind": "c4", "path": config.c4_path, "data_files": files}
    stats = build_sample_corpus(
        config.corpus_dir,
        config.languages,
        cache_dir=config.sample_cache_dir,
        packages=config.sample_packages,
        apt_update=config.apt_update,
    )
    print("sample corpus (after paragraph filter, language check and dedup):")
    print(format_stats(stats))
    source = C4Source(path=str(config.corpus_dir), num_files=None, english="multilingual")
    description = {
        "kind": "sample",
        "path": str(config.corpus_dir),
        "corpus_digest": corpus_digest(config.corpus_dir, config.languages),
        "corpus": {
            lang: {"megabytes": round(s.megabytes, 3), "documents": s.documents} for lang, s in stats.items()
        },
    }
    return source, description


def build_shards(config: BuildConfig) -> Path:
    """Run the whole build for a validated config; returns the output directory."""
    config.validate()
    out_dir = check_output_dir(config.output_dir, config.overwrite)  # fail before any work
    source, source_info = resolve_source(config)
    languages = list(config.languages)
    readers = {
        lang: DocumentReader(iter_texts(source, lang), config.validation_fraction, lang) for lang in languages
    }

    if config.tokenizer is None:
        corpus: list[str] = []  # training split only: validation documents never reach the tokenizer
        for lang in languages:
            corpus += readers[lang].read_ahead(
                config.tokenizer_train_bytes, config.budget("max_documents", lang)
            )
        if not corpus:
            raise ValueError(
                f"the corpus is empty after filtering: no training documents in any of {languages}"
            )
        tokenizer = train_tokenizer(corpus, config.vocab_size)
        tokenizer_name = str(out_dir / "tokenizer")
    else:
        tokenizer = load_tokenizer(config.tokenizer)
        tokenizer_name = config.tokenizer

    train: dict[str, TokenizedDocuments] = {}
    validation: dict[str, TokenizedDocuments] = {}
    for lang in languages:
        train[lang], validation[lang] = tokenize_language(
            readers[lang],
            tokenizer,
            max_documents=config.budget("max_documents", lang),
            max_tokens=config.budget("max_tokens", lang),
            batch_size=config.batch_size,
        )
        if len(train[lang]) == 0:
            raise ValueError(
                f"the corpus is empty after filtering for language {lang!r}: no training documents "
                f"(source {source_info['kind']!r}, path {source_info['path']!r})"
            )
        if validation[lang].num_tokens < config.seq_len:
            raise ValueError(
                f"validation for language {lang!r} has {validation[lang].num_tokens} tokens, fewer than one "
                f"sequence (seq_len={config.seq_len}); raise validation_fraction or add data"
            )

    all_docs = TokenizedDocuments.concatenate([train[lang] for lang in languages])
    doc_languages = np.concatenate([np.full(len(train[lang]), i) for i, lang in enumerate(languages)])
    partition = partition_documents(
        doc_languages,
        all_docs.lengths,
        len(languages),
        config.num_workers,
        config.partition,
        p=config.p,
        alpha=config.alpha,
        seed=config.seed,
    )
    train_sequences: dict[str, np.ndarray] = {}
    tokens_per_worker: dict[str, dict[str, int]] = {}
    for k, order in enumerate(tqdm(partition.workers, desc="packing workers", leave=False)):
        packed = pack_documents(all_docs, order, config.seq_len, doc_languages, len(languages))
        if len(packed.sequences) == 0:
            raise ValueError(
                f"worker {k} gets {int(all_docs.lengths[order].sum())} tokens, fewer than one sequence of "
                f"seq_len={config.seq_len}; lower num_workers or seq_len, or add data"
            )
        train_sequences[worker_split(k)] = packed.sequences
        tokens_per_worker[worker_split(k)] = dict(
            zip(languages, packed.language_tokens.tolist(), strict=True)
        )
    validation_sequences = {
        lang: pack_documents(validation[lang], np.arange(len(validation[lang])), config.seq_len).sequences
        for lang in languages
    }

    metadata = {
        "heloco_data_version": DATA_VERSION,
        "languages": languages,
        "num_workers": config.num_workers,
        "seq_len": config.seq_len,
        "tokens_per_worker": tokens_per_worker,
        "sequences_per_worker": {name: len(s) for name, s in train_sequences.items()},
        "validation_tokens": {lang: int(s.size) for lang, s in validation_sequences.items()},
        "validation_sequences": {lang: len(s) for lang, s in validation_sequences.items()},
        "tokenizer": tokenizer_name,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "partition": {
            "scheme": config.partition,
            "p": config.p,
            "alpha": config.alpha,
            "target_mixtures": np.round(partition.mixtures, 6).tolist(),
        },
        "source": {
            **source_info,
            "train_documents": {lang: len(train[lang]) for lang in languages},
            "validation_documents": {lang: len(validation[lang]) for lang in languages},
            "train_tokens": {lang: train[lang].num_tokens for lang in languages},
            "validation_fraction": config.validation_fraction,
        },
        "seed": config.seed,
        "build_config": config.data_fields(),
    }
    with atomic_directory(out_dir, config.overwrite) as tmp:
        save_shards(tmp, train_sequences, validation_sequences, tokenizer, metadata)
    print(f"per-worker language histogram (tokens), partition={config.partition}:")
    print(format_histogram(tokens_per_worker, languages))
    print(f"validation tokens: {metadata['validation_tokens']}")
    print(f"wrote {out_dir}")
    if config.push_to_hub:
        from data_prep.hub import push_shards_to_hub

        url = push_shards_to_hub(out_dir, config.push_to_hub, private=config.hub_private)
        print(f"pushed to {url}")
    return out_dir


def ensure_sample_shards(out_dir: str | Path, **overrides: Any) -> Path:
    """Shards from data_prep/configs/sample.yaml (with `overrides`) at `out_dir`; built only if absent.

    Existing shards are reused when they were built with the same data parameters; if they differ,
    ValueError lists the differences (pass overwrite=True to rebuild).
    """
    config = load_config(SAMPLE_CONFIG, **{**overrides, "output_dir": str(out_dir)})
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Runs started together build once: the others wait here, then find the shards.
    with FileLock(out.parent / f".{out.name}.lock"):
        if (out / "metadata.json").is_file() and not config.overwrite:
            built = read_metadata(out).get("build_config", {})
            wanted = config.data_fields()
            diff = {k: (built.get(k), v) for k, v in wanted.items() if built.get(k) != v}
            if diff:
                details = ", ".join(
                    f"{k}: built {a!r}, requested {b!r}" for k, (a, b) in sorted(diff.items())
                )
                raise ConfigError(
                    f"shards at {str(out)!r} were built with other parameters ({details}); pass overwrite=True"
                )
            return out
        return build_shards(config)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the shards ``argv`` describes. Run as a script through
    ``recipes.cli.run_cli``, a user mistake prints one line naming the field, not a traceback."""
    build_shards(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
