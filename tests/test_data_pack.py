"""Tokenizer training/saving/loading, document encoding with EOS, and packing into fixed-length rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from data_prep.pack import pack_documents
from data_prep.synthetic import synthetic_documents
from data_prep.tokenizer import (
    EOS_TOKEN,
    TokenizedDocuments,
    encode_documents,
    load_tokenizer,
    train_tokenizer,
)

DOCS = [
    "Der Hund läuft über die Straße.",
    "The quick brown fox jumps over the lazy dog.",
    "¿Dónde está la biblioteca? — «Ici», dit-il.",
    "Un documento con <|endoftext|> scritto dentro.",
]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [d for lang in ("de", "en", "es", "fr", "it") for d in synthetic_documents(lang, 40)] + DOCS * 5
    return train_tokenizer(corpus, vocab_size=400, show_progress=False)


def _docs(lengths):
    """Hand-made TokenizedDocuments: document i is [100*i + 1, ..., 100*i + n_i] then EOS (0)."""
    parts = [np.array([*(100 * i + 1 + np.arange(n)), 0], np.int32) for i, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    return TokenizedDocuments(np.concatenate(parts), offsets)


def test_tokenizer_save_and_load_round_trip(tokenizer, tmp_path):
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.eos_token_id == 0
    assert 300 < len(tokenizer) <= 400
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert len(loaded) == len(tokenizer)
    for doc in DOCS:
        ids = loaded(doc, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(doc, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == doc  # byte-level BPE: exact round trip, accents included
    assert load_tokenizer(tmp_path / "tok").eos_token_id == 0


def test_vocab_size_below_bytes_is_rejected():
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        train_tokenizer(["abc"], vocab_size=100)


def test_encode_documents_appends_eos_and_keeps_literal_special_text(tokenizer):
    docs = encode_documents(tokenizer, DOCS)
    assert len(docs) == len(DOCS)
    eos = tokenizer.eos_token_id
    for i, text in enumerate(DOCS):
        ids = docs.tokens[docs.offsets[i] : docs.offsets[i + 1]].tolist()
        assert ids[-1] == eos and eos not in ids[:-1]  # the literal "<|endoftext|>" is plain text
        assert tokenizer.decode(ids[:-1]) == text
    assert docs.num_tokens == int(docs.lengths.sum())


def test_packing_round_trip_decodes_to_documents_joined_by_eos(tokenizer):
    texts = [d for lang in ("de", "fr") for d in synthetic_documents(lang, 5, seed=3)]
    docs = encode_documents(tokenizer, texts)
    order = np.array([3, 0, 9, 1, 2, 8, 4, 5, 7, 6])
    joined = "".join(texts[i] + EOS_TOKEN for i in order)
    whole = pack_documents(docs, order, seq_len=1)  # nothing dropped
    assert tokenizer.decode(whole.sequences.reshape(-1).tolist()) == joined
    packed = pack_documents(docs, order, seq_len=16)
    assert packed.sequences.shape[1] == 16 and packed.sequences.dtype == np.int32
    assert len(packed.sequences) == docs.num_tokens // 16
    decoded = tokenizer.decode(packed.sequences.reshape(-1).tolist())
    assert joined.startswith(decoded) and len(joined) - len(decoded) < 16 * 8  # only the tail row dropped


def test_packing_by_hand_with_language_counts():
    docs = _docs([2, 3, 1])  # [1,2,0] [101,102,103,0] [201,0]
    packed = pack_documents(
        docs, np.array([2, 0, 1]), seq_len=4, doc_languages=np.array([0, 1, 1]), num_languages=2
    )
    np.testing.assert_array_equal(packed.sequences, [[201, 0, 1, 2], [0, 101, 102, 103]])
    # doc 2 (language 1) fills 2 positions, doc 0 (language 0) 3, doc 1 (language 1) the 3 kept ones
    np.testing.assert_array_equal(packed.language_tokens, [3, 5])


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=40),
    seq_len=st.integers(1, 50),
    seed=st.integers(0, 1000),
)
def test_packing_is_the_truncated_concatenation(lengths, seq_len, seed):
    docs = _docs(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    languages = rng.integers(0, 3, size=len(lengths))
    packed = pack_documents(docs, order, seq_len, languages, 3)
    stream = np.concatenate([docs.tokens[docs.offsets[i] : docs.offsets[i + 1]] for i in order])
    kept = len(stream) - len(stream) % seq_len
    np.testing.assert_array_equal(packed.sequences.reshape(-1), stream[:kept])
    stream_languages = np.concatenate([[languages[i]] * (lengths[i] + 1) for i in order])[:kept]
    np.testing.assert_array_equal(
        packed.language_tokens, np.bincount(stream_languages.astype(int), minlength=3)
    )


def test_concatenate_and_head():
    a, b = _docs([2, 1]), _docs([3])
    both = TokenizedDocuments.concatenate([a, b])
    assert len(both) == 3
    np.testing.assert_array_equal(both.lengths, [3, 2, 4])
    np.testing.assert_array_equal(both.head(2).tokens, a.tokens)
    assert len(TokenizedDocuments.concatenate([])) == 0
