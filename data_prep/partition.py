"""Partition documents to K workers with a chosen language skew; every document goes to exactly one worker.

Schemes (L languages, q = the corpus' language proportions in tokens):
  iid        every worker's target mixture is q;
  dominant   worker k draws a fraction p of its tokens from language k mod L, (1 - p)/(L - 1) from each other;
  dirichlet  worker k's mixture w_k ~ Dir(alpha * q)  (large alpha -> q, i.e. iid; small -> one language).

From target mixtures to token counts: every worker gets the same budget B, as large as the data allows
while every worker keeps its exact mixture (B = min over languages of supply_l / sum_k w_kl; with iid or
with equal supplies per language, B = total / K and nothing is left over). When a language runs out
first (say, thin French under a French-dominant worker), the other languages have tokens left over.
Every document is still used: the leftover of language l goes to the workers whose largest target
weight is l (in proportion to that weight; to all workers wanting l if none does). So the workers of
the scarce languages keep exactly their target mixture and the common budget, every worker's
non-dominant tokens are exactly as targeted, and the workers of plentiful languages grow and become
more skewed than p (never less). Equal per-language budgets (max_tokens) give equal workers.
Within a language, documents are shuffled (seeded) and cut into consecutive runs that match the token
counts to within one document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recipes.cli import ConfigError

SCHEMES = ("iid", "dominant", "dirichlet")


@dataclass
class Partition:
    """workers[k]: indices of the documents of worker k, in the order they will be packed."""

    workers: list[np.ndarray]
    mixtures: np.ndarray  # (K, L) target mixtures
    allocation: np.ndarray  # (K, L) target token counts


def validate_partition_args(scheme: str, num_workers: int, p: float, alpha: float) -> None:
    """Raise ValueError naming the field and accepted values, before any work is done."""
    if scheme not in SCHEMES:
        raise ConfigError(f"partition must be one of {SCHEMES}, got {scheme!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
        raise ConfigError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if scheme == "dominant" and not 0.0 <= p <= 1.0:
        raise ConfigError(f"p must be in [0, 1] for partition 'dominant', got {p}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ConfigError(f"alpha must be > 0 for partition 'dirichlet', got {alpha}")


def target_mixtures(
    scheme: str,
    num_workers: int,
    proportions: np.ndarray,
    *,
    p: float = 0.8,
    alpha: float = 1.0,
    rng: np.random.Generator,
) -> np.ndarray:
    """(K, L) matrix whose row k is worker k's language mixture (rows sum to 1)."""
    validate_partition_args(scheme, num_workers, p, alpha)
    q = np.asarray(proportions, dtype=np.float64)
    num_languages = len(q)
    if scheme == "iid":
        return np.tile(q, (num_workers, 1))
    if scheme == "dominant":
        if num_languages == 1:
            return np.ones((num_workers, 1))
        w = np.full((num_workers, num_languages), (1.0 - p) / (num_languages - 1))
        w[np.arange(num_workers), np.arange(num_workers) % num_languages] = p
        return w
    w = rng.dirichlet(alpha * q, size=num_workers)
    w = np.nan_to_num(w, nan=0.0)
    bad = w.sum(axis=1) <= 0  # possible only for extremely small alpha: all mass underflowed
    w[bad] = np.eye(num_languages)[np.argmax(q)]
    return w / w.sum(axis=1, keepdims=True)


def allocate_tokens(mixtures: np.ndarray, supply: np.ndarray) -> np.ndarray:
    """(K, L) token counts: equal budgets with exact mixtures as far as the scarcest language allows, then
    each language's leftover to the workers it dominates (see the module docstring)."""
    mixtures = np.asarray(mixtures, dtype=np.float64)
    supply = np.asarray(supply, dtype=np.float64)
    num_workers = mixtures.shape[0]
    demand = mixtures.sum(axis=0)  # tokens of language l needed per unit of common budget
    wanted = demand > 0
    budget = float(np.min(supply[wanted] / demand[wanted])) if wanted.any() else 0.0
    allocation = mixtures * budget
    leftover = np.clip(supply - allocation.sum(axis=0), 0.0, None)
    top = np.argmax(mixtures, axis=1)
    for lang in np.flatnonzero(leftover > 0):
        weights = np.where((top == lang) & (mixtures[:, lang] > 0), mixtures[:, lang], 0.0)
        if weights.sum() <= 0:
            weights = mixtures[:, lang].copy()
        if weights.sum() <= 0:
            weights = np.ones(num_workers)
        allocation[:, lang] += leftover[lang] * weights / weights.sum()
    return allocation


def partition_documents(
    doc_languages: np.ndarray,
    doc_tokens: np.ndarray,
    num_languages: int,
    num_workers: int,
    scheme: str,
    *,
    p: float = 0.8,
    alpha: float = 1.0,
    seed: int = 0,
) -> Partition:
    """Assign each document (language index, token count) to one worker; deterministic for a seed."""
    validate_partition_args(scheme, num_workers, p, alpha)
    doc_languages = np.asarray(doc_languages, dtype=np.int64)
    doc_tokens = np.asarray(doc_tokens, dtype=np.int64)
    if doc_languages.shape != doc_tokens.shape:
        raise ValueError("doc_languages and doc_tokens must have the same length")
    supply = np.bincount(doc_languages, weights=doc_tokens, minlength=num_languages).astype(np.float64)
    if supply.sum() <= 0:
        raise ValueError("cannot partition an empty corpus (no tokens in any language)")
    mixture_rng, shuffle_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    mixtures = target_mixtures(scheme, num_workers, supply / supply.sum(), p=p, alpha=alpha, rng=mixture_rng)
    allocation = allocate_tokens(mixtures, supply)

    owner = np.empty(len(doc_tokens), dtype=np.int64)
    for lang in range(num_languages):
        docs = np.flatnonzero(doc_languages == lang)
        if len(docs) == 0:
            continue
        docs = docs[shuffle_rng.permutation(len(docs))]
        ends = np.cumsum(doc_tokens[docs])
        middles = ends - doc_tokens[docs] / 2.0
        takers = np.flatnonzero(allocation[:, lang] > 0)  # never give a worker a language it excludes
        bounds = np.cumsum(allocation[takers, lang])
        bounds[-1] = np.inf  # float round-off must not push the last document past the end
        owner[docs] = takers[np.searchsorted(bounds, middles, side="right")]
    workers = []
    for k in range(num_workers):
        mine = np.flatnonzero(owner == k)
        workers.append(mine[shuffle_rng.permutation(len(mine))])
    return Partition(workers=workers, mixtures=mixtures, allocation=allocation)
