"""Exact top-k selection without ranking every element: the k largest magnitudes lie in the k groups
of largest maximum, so a top-k over group maxima and then over those groups' elements (per chunk,
or over the whole Δ with a sampled floor) ranks a few percent of the elements. Ties are broken
arbitrarily."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from heloco.codecs.checks import all_finite


def group_size(chunk: int, kept: int, numel: int) -> int:
    """S for ``top_by_groups`` (1: a plain top-k is cheaper): the power of two dividing the chunk
    that minimises the elements ranked, numel/S group maxima plus kept·S candidates, if that is
    under half of numel (two small top-k passes instead of one over everything)."""
    best, cost = 1, numel / 2
    for s in (2, 4, 8, 16, 32, 64):
        if chunk % s == 0 and numel // s >= kept and numel // s + kept * s < cost:
            best, cost = s, numel // s + kept * s
    return best


class NotFinite(ValueError):
    """A selection met NaN or Inf (the encoder then names the tensor holding it)."""


def top_per_chunk(x: Tensor, real: Tensor, k: int, padding: Tensor | None = None) -> Tensor:
    """(rows, k) indices of each row's k largest real magnitudes by a top-k over every element
    (the fallback when ``group_size`` finds no grouping that ranks fewer). Padding (position ≥
    ``real`` of its row, or listed in ``padding``) ranks −1: picked only after every real entry."""
    magnitude = x.abs()
    if not all_finite(magnitude.amax(1)):
        raise NotFinite
    magnitude.masked_fill_(torch.arange(x.shape[1]) >= real.unsqueeze(1), -1.0)
    if padding is not None:
        magnitude.view(-1).index_fill_(0, padding, -1.0)
    return magnitude.topk(k, dim=1, sorted=False).indices


def group_peaks(x: Tensor, real: Tensor, group: int) -> Tensor:
    """(rows, C/S): the absolute maximum of every group of the chunks ``x`` (group g of a chunk holds
    its elements g + s·G, s < S, G = C/S), from two strided reductions (amax, amin: one read of
    ``x`` each, faster than ``aminmax`` or an ``abs`` copy). A group holding only padding (g ≥ the
    chunk's ``real`` elements) ranks −1, below any real element. ``NotFinite`` on NaN or Inf."""
    rows, chunk = x.shape
    columns = chunk // group
    strided = x.view(rows, group, columns)
    peak = torch.maximum(strided.amax(1), strided.amin(1).neg_())
    if not all_finite(peak):
        raise NotFinite
    short = (real < chunk).nonzero().flatten()
    if short.numel():
        cut = peak[short]
        cut.masked_fill_(torch.arange(columns) >= real[short].unsqueeze(1), -1.0)
        peak[short] = cut
    return peak


def top_per_chunk_by_groups(x: Tensor, real: Tensor, k: int, group: int) -> Tensor:
    """(rows, k) indices in chunk of each chunk's k largest real magnitudes: the k groups of
    largest peak, then a top-k over their k·S elements (``TopKCodec`` says why that is exact)."""
    rows, chunk = x.shape
    columns = chunk // group
    groups = group_peaks(x, real, group).topk(k, dim=1, sorted=False).indices
    candidates = (groups.unsqueeze(2) + columns * torch.arange(group)).view(rows, k * group)
    magnitude = x.gather(1, candidates).abs_()
    magnitude.masked_fill_(candidates >= real.unsqueeze(1), -1.0)
    return candidates.gather(1, magnitude.topk(k, dim=1, sorted=False).indices)


SAMPLE = 2**16  # values sampled to guess a global top-k's threshold


def floor_below_top(values: Tensor, kept: int) -> tuple[float, Tensor] | None:
    """(floor, positions of the values ≥ floor) with at least ``kept`` such values, most likely only a
    few percent more: the matching quantile of a strided sample of ``values`` (1-D), lowered by a
    margin of four standard deviations of the sampling error. None when ``values`` is too small
    for a sample to pay, the floor is not positive, or (unlikely) fewer than ``kept`` reach it: the
    caller then ranks everything. Finding the floor costs a selection over the sample and one
    comparison pass, where a top-k would rank all of ``values``."""
    step = (values.numel() // SAMPLE) | 1  # odd: no aliasing with the chunks' row length
    if step < 4:
        return None
    sample = values[::step]
    expected = kept * sample.numel() / values.numel()
    rank = math.ceil(expected + 4 * math.sqrt(expected) + 8)  # the rank-th largest of the sample
    if rank >= sample.numel():
        return None
    floor = float(sample.kthvalue(sample.numel() - rank + 1).values)
    if not floor > 0:
        return None
    above = (values >= floor).nonzero().squeeze(1)
    return (floor, above) if above.numel() >= kept else None


def top_global_by_groups(x: Tensor, real: Tensor, peaks: Tensor, kept: int, group: int) -> Tensor:
    """Positions (in the flat staged buffer ``x``, count × C) of the ``kept`` largest real
    magnitudes: the ``kept`` groups of largest peak (``group_peaks``) over all chunks, then a top-k
    over their kept·S elements.

    Faster when ``floor_below_top`` finds a floor f ≤ the kept-th largest peak: the groups of
    peak ≥ f hold every kept entry (each is ≥ the kept-th largest peak ≥ f, so is its group's
    peak), and of their elements only those ≥ f can be kept, so the final top-k ranks those few
    rather than all kept·S elements."""
    chunk = x.shape[1]
    columns = chunk // group
    found = floor_below_top(peaks.view(-1), kept)
    groups = peaks.view(-1).topk(kept, sorted=False).indices if found is None else found[1]
    chunk_of, column = groups // columns, groups % columns
    candidates = ((chunk_of * chunk + column).unsqueeze(1) + columns * torch.arange(group)).view(-1)
    magnitude = x.view(-1)[candidates].abs_()
    if found is not None:
        reach = (magnitude >= found[0]).nonzero().squeeze(1)
        candidates, magnitude = candidates[reach], magnitude[reach]
    chunk_of = candidates // chunk
    magnitude.masked_fill_(candidates - chunk_of * chunk >= real[chunk_of], -1.0)  # padding
    if candidates.numel() == kept:
        return candidates
    return candidates[magnitude.topk(kept, sorted=False).indices]
