"""Tokenizer: train a byte-level BPE on the training split, or load any Hugging Face tokenizer.

Also the batched encoder that turns documents into one flat token array with EOS after each document,
which is what partitioning and packing work on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, *, eos_token: str = EOS_TOKEN, show_progress: bool = True
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: no unknown tokens, exact round trip) with `eos_token` as id 0."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """Any fast Hugging Face tokenizer (Hub name or local directory) that defines an EOS token."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no fast (tokenizers) backend; use a fast tokenizer")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} defines no eos_token; documents need one between them")
    return tokenizer


@dataclass
class TokenizedDocuments:
    """Documents as one flat token array; document i is tokens[offsets[i]:offsets[i+1]], EOS last."""

    tokens: np.ndarray  # int32
    offsets: np.ndarray  # int64, len = number of documents + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per document, EOS included."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def head(self, n: int) -> TokenizedDocuments:
        """The first n documents."""
        return TokenizedDocuments(self.tokens[: self.offsets[n]], self.offsets[: n + 1].copy())

    @staticmethod
    def concatenate(parts: Sequence[TokenizedDocuments]) -> TokenizedDocuments:
        if not parts:
            return TokenizedDocuments(np.zeros(0, np.int32), np.zeros(1, np.int64))
        tokens = np.concatenate([p.tokens for p in parts])
        shifts = np.cumsum([0] + [p.num_tokens for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)])
        return TokenizedDocuments(tokens, offsets.astype(np.int64))


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> TokenizedDocuments:
    """Encode a batch of documents with the Rust tokenizer (parallel) and append EOS to each.

    Literal special-token strings inside a document (say, "<|endoftext|>" in a web page) are encoded
    as plain text, so the only EOS ids in the stream are the document separators.
    """
    backend: Tokenizer = tokenizer.backend_tokenizer
    eos_id = tokenizer.eos_token_id
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        encodings = backend.encode_batch_fast(list(texts), add_special_tokens=False)
    finally:
        backend.encode_special_tokens = previous
    ids = [e.ids for e in encodings]
    lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    eos = [eos_id]
    tokens = np.fromiter(chain.from_iterable(x + eos for x in ids), np.int32, count=int(offsets[-1]))
    return TokenizedDocuments(tokens, offsets)
