"""Where the tensors of a message live: their shapes and what the header records about them
(``Layout``), and the flat fp32 buffer a codec encodes from, each tensor at an offset and its last
block or chunk zero-padded (``Staging``, ``Blocks``). All cached per list of shapes: a round encodes
the same model's shapes again and again."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math
import struct
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shapes of the tensors of a message and what the header records about them."""

    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...]
    numel: int
    crc: int

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` (n elements) cut into tensors of these shapes."""
        return [v.view(s) for v, s in zip(flat.split(list(self.numels)), self.shapes, strict=True)]


@functools.lru_cache(maxsize=16)
def layout_of(shapes: tuple[tuple[int, ...], ...]) -> Layout:
    numels = tuple(math.prod(s) for s in shapes)
    words = [w for s in shapes for w in (len(s), *s)]
    crc = zlib.crc32(struct.pack(f"<{len(words)}q", *words))
    return Layout(shapes, numels, sum(numels), crc)


@dataclasses.dataclass(frozen=True)
class Staging:
    """Where each tensor lives in the flat fp32 buffer a codec encodes from (``Codec.staging``):
    tensor i at ``offsets[i]``, followed by zeros up to a whole number of blocks (none for dense
    codecs). One flat buffer lets error feedback and the codec work in a few vectorised passes over
    the whole model instead of one small operation per tensor and per pass."""

    layout: Layout
    numel: int
    offsets: tuple[int, ...]

    def views(self, flat: Tensor) -> list[Tensor]:
        """The tensors' places inside a staged buffer (flat or shaped)."""
        flat = flat.view(-1)
        return [
            flat[o : o + n].view(s)
            for o, n, s in zip(self.offsets, self.layout.numels, self.layout.shapes, strict=True)
        ]

    def fill(self, flat: Tensor, tensors: Sequence[Tensor]) -> None:
        """Copy ``tensors`` into their places (the padding is left as it is: zero)."""
        torch._foreach_copy_(self.views(flat), list(tensors))

    def real_within(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(tensor i, lo, hi) for each tensor whose elements occupy [lo, hi) ⊆ [start, stop) of the
        staged buffer (padding excluded)."""
        found = []
        i = max(0, bisect.bisect_right(self.offsets, start) - 1)
        while i < len(self.offsets) and self.offsets[i] < stop:
            lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i] + self.layout.numels[i])
            if lo < hi:
                found.append((i, lo, hi))
            i += 1
        return found

    @functools.cached_property
    def packed_offsets(self) -> tuple[int, ...]:
        """Where each tensor starts when they are back to back without padding (the wire's order)."""
        return tuple(itertools.accumulate(self.layout.numels, initial=0))[:-1]


@functools.lru_cache(maxsize=16)
def staging_of(shapes: tuple[tuple[int, ...], ...], block: int) -> Staging:
    layout = layout_of(shapes)
    offsets = [0]
    for n in layout.numels:
        offsets.append(offsets[-1] + -(-n // block) * block)
    return Staging(layout, offsets[-1], tuple(offsets[:-1]))


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Each tensor cut into blocks of ``block`` elements (its last one padded): block j holds
    ``real[j]`` real elements; the padded copy of all tensors (``staging``) is ``count`` × ``block``."""

    layout: Layout
    block: int
    count: int
    staging: Staging
    real: Tensor  # int64 (count,)
    padding: Tensor  # int64 positions of the padding in the padded copy

    @property
    def offsets(self) -> tuple[int, ...]:
        return self.staging.offsets

    def pad(self, tensors: Sequence[Tensor], padded: Tensor) -> Tensor:
        """Copy ``tensors`` into their places in ``padded`` (count·block fp32, padding left as it
        is); return it shaped (count, block)."""
        self.staging.fill(padded, tensors)
        return padded.view(self.count, self.block)

    def views(self, padded: Tensor) -> list[Tensor]:
        """The tensors' places inside a padded copy (flat or shaped)."""
        return self.staging.views(padded)


@functools.lru_cache(maxsize=16)
def blocks_of(shapes: tuple[tuple[int, ...], ...], block: int) -> Blocks:
    staging = staging_of(shapes, block)
    layout = staging.layout
    per_tensor = [-(-n // block) for n in layout.numels]
    real = [
        min(block, n - j * block) for n, b in zip(layout.numels, per_tensor, strict=True) for j in range(b)
    ]
    padding = [
        torch.arange(o + n, o + b * block)
        for o, n, b in zip(staging.offsets, layout.numels, per_tensor, strict=True)
        if n < b * block
    ]
    real_t = torch.tensor(real, dtype=torch.int64)
    return Blocks(
        layout,
        block,
        sum(per_tensor),
        staging,
        real_t,
        torch.cat(padding) if padding else torch.zeros(0, dtype=torch.int64),
    )
