"""Publish built shards to the Hugging Face Hub as one DatasetDict with a dataset card.

Splits: train_worker_0 ... train_worker_{K-1} and validation_<lang>. The card (README.md with YAML
metadata) shows each worker's language histogram and the build parameters; the tokenizer and
metadata.json are uploaded next to the data so the repository is self-contained. Only the standard
huggingface_hub / datasets API is used, so HF_ENDPOINT redirects everything (e.g. to a test server).
The token comes from the argument, HF_TOKEN or the saved login, and is never printed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from huggingface_hub import DatasetCard, DatasetCardData, HfApi

from data_prep.shards import load_shards

_LICENSES = {"c4": "odc-by"}


def hub_split_name(prefix: str, name: str) -> str:
    """Split names the Hub accepts (letters, digits, underscores): 'validation_pt_BR'."""
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"


def hub_dataset_dict(train: DatasetDict, validation: DatasetDict) -> DatasetDict:
    """train (worker_k) and validation (<lang>) merged into one DatasetDict with prefixed split names."""
    splits = {hub_split_name("train", name): ds for name, ds in train.items()}
    splits.update({hub_split_name("validation", lang): ds for lang, ds in validation.items()})
    return DatasetDict(splits)


def dataset_card(metadata: dict[str, Any], repo_id: str | None = None) -> DatasetCard:
    """README.md: YAML metadata + per-worker language histograms (tokens) + build parameters."""
    languages = metadata["languages"]
    kind = metadata.get("source", {}).get("kind", "unknown")
    card_data = DatasetCardData(
        language=[lang.split("-")[0] for lang in languages],
        license=_LICENSES.get(kind, "other"),
        pretty_name=f"heloco non-IID shards ({metadata['partition']['scheme']}, K={metadata['num_workers']})",
        task_categories=["text-generation"],
        tags=["heloco", "diloco", "non-iid", "federated", "multilingual"],
    )
    header = "| worker | " + " | ".join(languages) + " | total tokens | sequences |"
    rule = "|---" * (len(languages) + 3) + "|"
    rows = []
    for worker, counts in metadata["tokens_per_worker"].items():
        total = sum(counts.values())
        cells = " | ".join(
            f"{counts.get(lang, 0):,} ({100 * counts.get(lang, 0) / max(total, 1):.0f}%)"
            for lang in languages
        )
        rows.append(f"| {worker} | {cells} | {total:,} | {metadata['sequences_per_worker'][worker]:,} |")
    validation = " | ".join(f"{metadata['validation_tokens'][lang]:,}" for lang in languages)
    partition = metadata["partition"]
    params = {
        "source": kind,
        "languages": ", ".join(languages),
        "num_workers": metadata["num_workers"],
        "partition": partition["scheme"],
        "p": partition.get("p"),
        "alpha": partition.get("alpha"),
        "seq_len": metadata["seq_len"],
        "tokenizer": _tokenizer_label(metadata),
        "vocab_size": metadata["vocab_size"],
        "eos_token_id": metadata["eos_token_id"],
        "seed": metadata["seed"],
    }
    load = f'load_dataset("{repo_id}")' if repo_id else "load_dataset(<repo>)"
    body = "\n".join(
        [
            f"# {card_data.pretty_name}",
            "",
            "Language-skewed non-IID worker shards for asynchronous DiLoCo-style training, built with "
            "`python -m data_prep.build` from the heloco repository. Each `train_worker_k` split is the "
            f"data of one worker; each `validation_<lang>` split is held out per language. `{load}` gives "
            f"all splits; every row is `input_ids`, {metadata['seq_len']} token ids with EOS between documents.",
            "",
            "## Per-worker language histogram (tokens)",
            "",
            header,
            rule,
            *rows,
            "",
            "## Validation tokens per language",
            "",
            "| " + " | ".join(languages) + " |",
            "|---" * len(languages) + "|",
            f"| {validation} |",
            "",
            "## Build parameters",
            "",
            "| parameter | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in params.items()),
            "",
            "The tokenizer is in `tokenizer/` and the full build metadata in `metadata.json`.",
            "",
        ]
    )
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def _tokenizer_label(metadata: dict[str, Any]) -> str:
    if metadata.get("build_config", {}).get("tokenizer") is None:
        return "tokenizer/ (byte-level BPE trained on the training split)"
    return str(metadata["tokenizer"])


def push_shards_to_hub(
    shard_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Create the dataset repo if needed, push card, data, tokenizer and metadata; returns the repo URL.

    The card goes first so that `datasets` merges its split configuration into it rather than
    replacing it.
    """
    shard_dir = Path(shard_dir).expanduser()
    train, validation, metadata = load_shards(shard_dir)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    dataset_card(metadata, repo_id).push_to_hub(repo_id, repo_type="dataset", token=token)
    hub_dataset_dict(train, validation).push_to_hub(
        repo_id, token=token, commit_message="Upload heloco shards"
    )
    api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=str(shard_dir / "tokenizer"),
        path_in_repo="tokenizer",
    )
    public_metadata = {k: v for k, v in metadata.items() if k != "tokenizer_path"}
    public_metadata["tokenizer"] = _tokenizer_label(metadata)  # not a path on the builder's machine
    api.upload_file(
        repo_id=repo_id,
        repo_type="dataset",
        path_or_fileobj=json.dumps(public_metadata, indent=2).encode(),
        path_in_repo="metadata.json",
    )
    return str(url)
