"""Encoders work through the staged buffer a tile at a time: the tile's passes (error feedback's
Δ + β·e, then the codec's own) reuse it from the cache instead of streaming the whole model from
memory once per pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from heloco.codecs.layout import Staging

TILE = 2**18  # elements (1 MiB of fp32)

Fill = Callable[[int, int], None]  # writes the values to encode into flat[start:stop]


def tiles(numel: int, unit: int, share: int = 1) -> list[tuple[int, int]]:
    """[start, stop) ranges of whole units (blocks, chunks) covering ``numel`` elements, each about
    ``TILE / share`` elements long (``TILE`` read when called, so a test can shrink it): an encoder
    keeping several tile-sized buffers at once takes a share so that they all stay in the cache."""
    step = max(1, TILE // share // unit) * unit
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def longest_tile(numel: int) -> int:
    """Elements of a scratch buffer that holds any tile of ``numel`` elements (``TILE`` read when
    called)."""
    return min(TILE, numel)


def tile_filler(
    flat: Tensor,
    staging: Staging,
    tensors: Sequence[Tensor],
    residual: Tensor | None = None,
    decay: float = 1.0,
) -> Fill:
    """A ``Fill`` writing ``tensors`` (+ ``decay`` × ``residual``, a staged buffer, when given) into
    their places of ``flat`` within [start, stop): error feedback's a = Δ + β·e, one tile at a
    time, so the encoder reads it back from the cache. Padding is never written."""
    pieces = [t.detach().reshape(-1) for t in tensors]

    def fill(start: int, stop: int) -> None:
        for i, lo, hi in staging.real_within(start, stop):
            piece = pieces[i][lo - staging.offsets[i] : hi - staging.offsets[i]]
            if residual is None:
                flat[lo:hi].copy_(piece)
            else:
                torch.add(piece, residual[lo:hi], alpha=decay, out=flat[lo:hi])

    return fill
