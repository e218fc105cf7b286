"""Partitioning documents to workers: exactly-once assignment, the three schemes, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.partition import allocate_tokens, partition_documents, target_mixtures


def _histogram(part, doc_languages, doc_tokens, num_languages):
    return np.array(
        [np.bincount(doc_languages[w], weights=doc_tokens[w], minlength=num_languages) for w in part.workers]
    )


def _corpus(num_languages, docs_per_language, seed=0, max_len=50):
    rng = np.random.default_rng(seed)
    languages = np.repeat(np.arange(num_languages), docs_per_language)
    tokens = rng.integers(1, max_len + 1, size=len(languages))
    return languages, tokens


@settings(max_examples=60, deadline=None)
@given(
    num_languages=st.integers(1, 5),
    num_workers=st.integers(1, 9),
    scheme=st.sampled_from(["iid", "dominant", "dirichlet"]),
    p=st.floats(0.0, 1.0),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_every_document_is_assigned_exactly_once(num_languages, num_workers, scheme, p, alpha, seed, data):
    n = data.draw(st.integers(num_languages, 300))
    languages = np.array(data.draw(st.lists(st.integers(0, num_languages - 1), min_size=n, max_size=n)))
    languages[:num_languages] = np.arange(num_languages)  # every language present
    tokens = np.array(data.draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n)))
    part = partition_documents(
        languages, tokens, num_languages, num_workers, scheme, p=p, alpha=alpha, seed=seed
    )
    assigned = np.concatenate(part.workers)
    assert len(part.workers) == num_workers
    assert sorted(assigned.tolist()) == list(range(n))


def test_allocation_by_hand():
    # Two workers, 80/20 and 20/80; language 1 (50 tokens) runs out first: common budget 50,
    # exact mixtures give [[40, 10], [10, 40]]; language 0's 50 leftover tokens go to worker 0, whose
    # largest weight is language 0.
    allocation = allocate_tokens(np.array([[0.8, 0.2], [0.2, 0.8]]), np.array([100.0, 50.0]))
    np.testing.assert_allclose(allocation, [[90.0, 10.0], [10.0, 40.0]])
    # Equal supplies: no leftover, equal budgets, exact mixtures.
    allocation = allocate_tokens(np.array([[0.8, 0.2], [0.2, 0.8]]), np.array([60.0, 60.0]))
    np.testing.assert_allclose(allocation, [[48.0, 12.0], [12.0, 48.0]])


def test_dominant_mixtures_by_hand():
    w = target_mixtures("dominant", 4, np.array([0.5, 0.3, 0.2]), p=0.7, rng=np.random.default_rng(0))
    expected = np.array([[0.7, 0.15, 0.15], [0.15, 0.7, 0.15], [0.15, 0.15, 0.7], [0.7, 0.15, 0.15]])
    np.testing.assert_allclose(w, expected)


def test_iid_gives_every_worker_the_corpus_mixture():
    languages, tokens = _corpus(5, 400, seed=1)
    part = partition_documents(languages, tokens, 5, 4, "iid", seed=3)
    hist = _histogram(part, languages, tokens, 5)
    supply = np.bincount(languages, weights=tokens)
    # each worker holds a quarter of every language, to within one document (max 50 tokens) per boundary
    assert np.all(np.abs(hist - supply / 4) <= 50)
    totals = hist.sum(axis=1)
    assert totals.max() - totals.min() <= 5 * 2 * 50


def test_dominant_p1_gives_single_language_workers():
    languages, tokens = _corpus(3, 200, seed=2)
    tokens[languages == 2] *= 3  # unequal supplies must not leak other languages in
    for num_workers in (3, 7):
        part = partition_documents(languages, tokens, 3, num_workers, "dominant", p=1.0, seed=0)
        for k, docs in enumerate(part.workers):
            assert len(docs) > 0
            assert set(languages[docs].tolist()) == {k % 3}


def test_dominant_p08_with_equal_supplies_is_balanced_and_skewed():
    languages, tokens = _corpus(5, 1000, seed=4)
    tokens = np.full_like(tokens, 10)  # equal supplies: exact mixtures and equal workers
    part = partition_documents(languages, tokens, 5, 5, "dominant", p=0.8, seed=0)
    hist = _histogram(part, languages, tokens, 5)
    shares = hist / hist.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.diag(shares), 0.8, atol=0.01)
    np.testing.assert_allclose(hist.sum(axis=1), 10_000, atol=50)


def test_scarce_language_keeps_exact_mixture_others_grow():
    languages, tokens = _corpus(2, 1000, seed=5)
    tokens = np.full_like(tokens, 10)
    keep = (languages == 0) | (np.arange(len(languages)) % 4 == 0)  # language 1: a quarter of language 0
    languages, tokens = languages[keep], tokens[keep]
    part = partition_documents(languages, tokens, 2, 2, "dominant", p=0.8, seed=0)
    hist = _histogram(part, languages, tokens, 2)
    assert hist[1, 1] / hist[1].sum() == pytest.approx(0.8, abs=0.01)  # the scarce language's worker
    assert hist[0, 0] / hist[0].sum() > 0.8  # the plentiful one only becomes more skewed
    assert hist[0, 1] == pytest.approx(hist[1, 0], abs=10)  # minority tokens exactly as targeted


def test_dirichlet_large_alpha_approaches_iid_small_alpha_is_skewed():
    q = np.array([0.4, 0.3, 0.2, 0.1])
    rng = np.random.default_rng(0)
    large = target_mixtures("dirichlet", 50, q, alpha=1e5, rng=rng)
    small = target_mixtures("dirichlet", 50, q, alpha=0.05, rng=rng)
    assert np.abs(large - q).max() < 0.01
    assert np.abs(small - q).max() > 0.5
    assert np.allclose(large.sum(axis=1), 1.0) and np.allclose(small.sum(axis=1), 1.0)
    languages, tokens = _corpus(4, 500, seed=6)
    part = partition_documents(languages, tokens, 4, 3, "dirichlet", alpha=1e5, seed=1)
    hist = _histogram(part, languages, tokens, 4)
    iid = _histogram(partition_documents(languages, tokens, 4, 3, "iid", seed=1), languages, tokens, 4)
    assert np.abs(hist - iid).max() < 0.02 * iid.max()


def test_same_seed_same_partition_other_seed_differs():
    languages, tokens = _corpus(3, 300, seed=7)
    a = partition_documents(languages, tokens, 3, 4, "dirichlet", alpha=0.5, seed=11)
    b = partition_documents(languages, tokens, 3, 4, "dirichlet", alpha=0.5, seed=11)
    c = partition_documents(languages, tokens, 3, 4, "dirichlet", alpha=0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a.workers, b.workers, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.workers, c.workers, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "zipf"}, r"partition must be one of \('iid', 'dominant', 'dirichlet'\)"),
        ({"p": 1.5}, r"p must be in \[0, 1\]"),
        ({"p": -0.1}, r"p must be in \[0, 1\]"),
        ({"scheme": "dirichlet", "alpha": 0.0}, r"alpha must be > 0"),
        ({"scheme": "dirichlet", "alpha": -1.0}, r"alpha must be > 0"),
        ({"num_workers": 0}, r"num_workers must be an integer >= 1"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, message):
    languages, tokens = _corpus(2, 10)
    args = {"scheme": "dominant", "num_workers": 2, "p": 0.8, "alpha": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        partition_documents(
            languages, tokens, 2, args["num_workers"], args["scheme"], p=args["p"], alpha=args["alpha"]
        )
