"""Pack tokenized documents into fixed-length sequences (EOS already closes every document).

Why numpy gathers instead of Python loops: packing runs over every token of the corpus; a vectorized
gather keeps it a small fraction of tokenization time (see benchmarks/data_prep.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.tokenizer import TokenizedDocuments


@dataclass
class Packed:
    """sequences: (n, seq_len) int32; language_tokens[l]: how many of those positions language l fills."""

    sequences: np.ndarray
    language_tokens: np.ndarray


def pack_documents(
    docs: TokenizedDocuments,
    order: np.ndarray,
    seq_len: int,
    doc_languages: np.ndarray | None = None,
    num_languages: int = 1,
) -> Packed:
    """Concatenate documents `order` (each followed by its EOS) and cut into rows of `seq_len` tokens.

    The trailing partial row is dropped, so no padding is needed. Each position is attributed to the
    language of the document it comes from (a document's EOS counts for that document's language).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    order = np.asarray(order, dtype=np.int64)
    starts = docs.offsets[order]
    lengths = docs.offsets[order + 1] - starts
    total = int(lengths.sum())
    kept = total - total % seq_len
    out_starts = np.cumsum(lengths) - lengths
    # position i of the output reads tokens[i + (start of its document - output start of its document)]
    gather = np.repeat(starts - out_starts, lengths)[:kept] + np.arange(kept)
    sequences = docs.tokens[gather].reshape(-1, seq_len)
    if doc_languages is None:
        language_tokens = np.array([kept], dtype=np.int64)
    else:
        position_language = np.repeat(np.asarray(doc_languages)[order], lengths)[:kept]
        language_tokens = np.bincount(position_language, minlength=num_languages).astype(np.int64)
    return Packed(sequences=sequences, language_tokens=language_tokens)
