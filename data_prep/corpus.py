"""Reading one language's document stream: the validation hold-out and the document/token budgets.

The stream is consumed lazily, so a budget stops reading (and, for C4, downloading) as soon as it is
met. A document belongs to the validation part when a hash of its text falls below
`validation_fraction`: the choice depends on the text only, not on the order, the seed or the
budgets, so the same documents are held out in every build and never leak into training (or into
the tokenizer's training text).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from data_prep.tokenizer import TokenizedDocuments, encode_documents


def is_validation(text: str, fraction: float) -> bool:
    """Stable, order-free hold-out decision for one document."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


class DocumentReader:
    """One language's documents, split into train and validation as they are read."""

    def __init__(self, texts: Iterable[str], validation_fraction: float, language: str) -> None:
        self.language = language
        self._texts = iter(texts)
        self._fraction = validation_fraction
        self._buffer: list[str] = []  # train documents read ahead (for tokenizer training)
        self.validation: list[str] = []
        self.train_read = 0
        self._bar = tqdm(desc=f"reading {language}", unit="doc", leave=False)

    def _next_train(self) -> str | None:
        for text in self._texts:
            self._bar.update()
            if is_validation(text, self._fraction):
                self.validation.append(text)
            else:
                self.train_read += 1
                return text
        return None

    def read_ahead(self, max_bytes: int, max_documents: int | None) -> list[str]:
        """Buffer train documents until `max_bytes` of text or `max_documents`; returns the buffer."""
        size = sum(len(t.encode()) for t in self._buffer)
        while size < max_bytes and (max_documents is None or len(self._buffer) < max_documents):
            text = self._next_train()
            if text is None:
                break
            self._buffer.append(text)
            size += len(text.encode())
        return self._buffer

    def train_batches(self, batch_size: int, max_documents: int | None) -> Iterator[list[str]]:
        """Train documents in batches: the read-ahead buffer first, then the rest of the stream."""
        remaining = max_documents
        buffered, self._buffer = self._buffer, []
        if remaining is not None:
            buffered = buffered[:remaining]
            remaining -= len(buffered)
        for i in range(0, len(buffered), batch_size):
            yield buffered[i : i + batch_size]
        while remaining is None or remaining > 0:
            batch: list[str] = []
            limit = batch_size if remaining is None else min(batch_size, remaining)
            while len(batch) < limit:
                text = self._next_train()
                if text is None:
                    break
                batch.append(text)
            if not batch:
                return
            if remaining is not None:
                remaining -= len(batch)
            yield batch
            if len(batch) < limit:
                return

    def close(self) -> None:
        self._bar.close()


def tokenize_language(
    reader: DocumentReader,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_documents: int | None,
    max_tokens: int | None,
    batch_size: int,
) -> tuple[TokenizedDocuments, TokenizedDocuments]:
    """(train, validation) tokenized documents of one language, within the budgets.

    The token budget counts each document with its EOS and stops after the document that reaches it.
    Validation holds the documents held out among everything read up to that point.
    """
    parts: list[TokenizedDocuments] = []
    total = 0
    bar = tqdm(desc=f"tokenizing {reader.language}", unit="tok", unit_scale=True, leave=False)
    for batch in reader.train_batches(batch_size, max_documents):
        docs = encode_documents(tokenizer, batch)
        if max_tokens is not None and total + docs.num_tokens >= max_tokens:
            needed = int(np.searchsorted(np.cumsum(docs.lengths), max_tokens - total)) + 1
            docs = docs.head(min(needed, len(docs)))
            parts.append(docs)
            bar.update(docs.num_tokens)
            break
        parts.append(docs)
        total += docs.num_tokens
        bar.update(docs.num_tokens)
    bar.close()
    reader.close()
    validation = [
        encode_documents(tokenizer, reader.validation[i : i + batch_size])
        for i in range(0, len(reader.validation), batch_size)
    ]
    return TokenizedDocuments.concatenate(parts), TokenizedDocuments.concatenate(validation)
