"""Top-k with 2..8-bit values, per chunk or over the whole Δ: >200× fewer bytes than fp32 at 1% in
2 bits, what error feedback makes converge (SparseLoCo). The selection itself is in ``selection``."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from heloco.codecs.base import Codec
from heloco.codecs.bits import pack_bits, unpack_bits
from heloco.codecs.checks import check_int, check_scales, largest_decoded, raise_not_finite, shapes_of
from heloco.codecs.layout import Blocks, Staging, blocks_of
from heloco.codecs.selection import (
    NotFinite,
    group_peaks,
    group_size,
    top_global_by_groups,
    top_per_chunk,
    top_per_chunk_by_groups,
)
from heloco.codecs.tiling import Fill, tiles
from heloco.codecs.wire import CODEC_IDS, EncodedMessage, MalformedMessage

TOPK_SCOPES = ("chunk", "global")
GLOBAL_TOPK_ID = CODEC_IDS["topk (global scope)"]
MAX_CHUNK = 2**16  # top-k chunk size: index ≤ 16 bits, an entry's field ≤ 24 bits (int32 arithmetic)


def kept_of(fraction: float, numel: int) -> int:
    """⌈fraction·numel⌉ entries, at least 1 and at most numel (0.03 × 100: 3, not 4)."""
    return min(numel, max(1, math.ceil(round(fraction * numel, 9))))


def dequantize(level: Tensor, negative: Tensor, lo: Tensor, step: Tensor) -> Tensor:
    """sign·(lo + (level + ½)·step) in fp32: the decoder's values, and error feedback's, computed
    by this one function so that both agree bit for bit."""
    magnitude = lo + level.to(torch.float32).add_(0.5) * step
    return magnitude * (1 - 2 * negative).to(torch.float32)


@dataclasses.dataclass(frozen=True)
class Entries:
    """Where the kept entries of a top-k message belong: chunk j keeps ``kept[j]`` of them."""

    blocks: Blocks
    count: int  # E
    full: bool  # every chunk keeps k (scope chunk; no chunk with fewer than k real elements)
    chunk: Tensor  # int64 (E,): the chunk of each entry
    start: Tensor  # int64 (E,): where that chunk starts in the padded copy
    offset_in_tensor: Tensor  # int64 (E,): where that chunk starts in its tensor
    per_tensor: tuple[int, ...]  # how many entries each tensor holds
    limit: Tensor  # int64 (E,): real elements of that chunk (indices must be below)
    same_chunk_as_next: Tensor  # bool (E−1,)


def entries_from_counts(blocks: Blocks, kept: Tensor, full: bool) -> Entries:
    """The ``Entries`` of a message whose chunk j holds ``kept[j]`` entries."""
    chunk = blocks.block
    chunk_of = torch.repeat_interleave(torch.arange(blocks.count), kept)
    first_chunk = torch.tensor(blocks.offsets, dtype=torch.int64) // chunk  # of each tensor
    chunks_per_tensor = [-(-n // chunk) for n in blocks.layout.numels]
    tensor_of = torch.repeat_interleave(torch.arange(len(chunks_per_tensor)), torch.tensor(chunks_per_tensor))
    per_tensor = torch.zeros(len(chunks_per_tensor), dtype=torch.int64).index_add_(0, tensor_of, kept)
    return Entries(
        blocks,
        int(kept.sum()),
        full,
        chunk_of,
        chunk_of * chunk,
        (chunk_of - first_chunk[tensor_of[chunk_of]]) * chunk,
        tuple(per_tensor.tolist()),
        blocks.real[chunk_of],
        chunk_of[1:] == chunk_of[:-1],
    )


@functools.lru_cache(maxsize=16)
def entries_of(shapes: tuple[tuple[int, ...], ...], chunk: int, k: int) -> Entries:
    """Scope chunk: chunk j keeps min(k, real_j) entries, fixed by the layout (cached)."""
    blocks = blocks_of(shapes, chunk)
    kept = blocks.real.clamp(max=k)
    return entries_from_counts(blocks, kept, bool((kept == k).all()))


class TopKCodec(Codec):
    """Top-k with b-bit values (SparseLoCo, arXiv 2508.15706: top-k of 1-3% per chunk, 2-bit values,
    error feedback), per chunk (``scope="chunk"``, the default) or over the whole Δ
    (``scope="global"``).

    Each tensor is cut into chunks of C = ``chunk`` elements (its last chunk may hold m_j < C real
    ones). With f = ``fraction``:

    * scope chunk: every chunk keeps its k_j = min(k, m_j) entries of largest magnitude, k = ⌈f·C⌉,
      so every chunk gets its share whatever its magnitude;
    * scope global: the K = min(n, ⌈f·n⌉) entries of largest magnitude over all n elements are kept,
      wherever they are (c_j of them in chunk j, Σ c_j = K), so a layer whose Δ is small sends little.

    Dropped entries decode to 0.

    Values: with lo_j and hi_j the smallest and largest kept magnitude of chunk j, L = 2^(b−1) levels
    and step_j = (hi_j − lo_j)/L, a kept value v is sent as its sign bit and the level
    l = min(⌊(|v| − lo_j)/step_j⌋, L − 1), and decoded as sign·(lo_j + (l + ½)·step_j): the error is
    ≤ step_j/2. Using the range of the kept magnitudes rather than [0, max] matters at 2 bits: kept
    entries are the largest ones, so [0, lo) would waste levels. A chunk that keeps nothing (global
    scope) has lo_j = step_j = 0.

    Entries: field = (index in chunk << b) | (sign << (b−1)) | l, w = ⌈log2 C⌉ + b bits, packed LSB
    first (``pack_bits``), chunk after chunk, indices increasing within a chunk. Body, with N_c the
    number of chunks:

    * chunk: N_c pairs (lo_j, step_j) in fp32, then the E = Σ_j k_j packed fields:
      32 + 8·N_c + ⌈E·w/8⌉ bytes. Top-1% of C = 4096 in 2 bits: 41 entries × 14 bits + 8 bytes =
      79.75 bytes per chunk, ≈205× fewer than fp32's 16384.
    * global: N_c pairs (lo_j, step_j), then the N_c counts c_j in ⌊log2 C⌋ + 1 bits each (0..C),
      packed, then the K packed fields: 32 + 8·N_c + ⌈N_c·(⌊log2 C⌋ + 1)/8⌉ + ⌈K·w/8⌉ bytes, a size
      fixed by the layout like every codec's. Top-1% of n = 4096·N_c in 2 bits, C = 4096: K = 40.96
      entries per chunk on average: 8 + 13/8 + 40.96·14/8 = 81.3 bytes per chunk, ≈202× fewer than
      fp32. The header's k is K, and global messages have their own codec id (5), so a decoder of
      one scope refuses the other's messages.

    Selection is exact (ties broken arbitrarily) without a top-k over every element: a chunk's C
    elements are split into G = C/S groups of S (group g: elements g, g + G, g + 2G, …, a strided
    view that two fast reductions summarise). The kept entries all lie in the k (or K) groups of
    largest absolute maximum: any element outside them is at most the smallest of those k maxima,
    which are themselves k elements at least that large. So the final top-k ranks only those
    groups' k·S elements (S = 8 at C = 4096, k = 41: 512 + 328 values ranked instead of 4096;
    ``group_size``, ``top_per_chunk_by_groups``, ``top_global_by_groups``).
    """

    name = "topk"
    codec_id = CODEC_IDS["topk"]  # chunk scope; global scope messages carry GLOBAL_TOPK_ID

    def __init__(
        self, fraction: float = 0.01, bits: int = 2, chunk: int = 4096, scope: str = "chunk"
    ) -> None:
        check_int("topk", "bits", bits, 2, 8)
        check_int("topk", "chunk", chunk, 2, MAX_CHUNK)
        if not (
            isinstance(fraction, numbers.Real)
            and not isinstance(fraction, bool)
            and math.isfinite(fraction)
            and 0 < fraction <= 1
        ):
            raise ValueError(f"topk fraction must be a number in (0, 1], got {fraction!r}")
        if scope not in TOPK_SCOPES:
            raise ValueError(f"topk scope must be one of {', '.join(TOPK_SCOPES)}; got {scope!r}")
        super().__init__()
        self.fraction = float(fraction)
        self.bits = bits
        self.chunk = chunk
        self.scope = scope
        self.codec_id = GLOBAL_TOPK_ID if scope == "global" else TopKCodec.codec_id
        self.k = kept_of(self.fraction, chunk)  # per chunk (scope chunk)
        self.written = torch.zeros(0, dtype=torch.int64)  # positions the last decode wrote
        self.index_bits = (chunk - 1).bit_length()
        self.width = self.index_bits + bits
        self.count_bits = chunk.bit_length()  # a chunk's count of kept entries, 0..C (scope global)

    def options(self) -> dict[str, int | float | str]:
        return {"fraction": self.fraction, "bits": self.bits, "chunk": self.chunk, "scope": self.scope}

    def header_params(self, numel: int) -> tuple[int, int, int]:
        return self.bits, self.chunk, self.k if self.scope == "chunk" else kept_of(self.fraction, numel)

    def staging(self, shapes: Sequence[Sequence[int]]) -> Staging:
        return blocks_of(tuple(tuple(int(d) for d in s) for s in shapes), self.chunk).staging

    def body_nbytes(self, shapes: tuple[tuple[int, ...], ...]) -> int:
        if self.scope == "chunk":
            entries = entries_of(shapes, self.chunk, self.k)
            return 8 * entries.blocks.count + -(-entries.count * self.width // 8)
        blocks = blocks_of(shapes, self.chunk)
        kept = kept_of(self.fraction, blocks.layout.numel)
        return 8 * blocks.count + -(-blocks.count * self.count_bits // 8) + -(-kept * self.width // 8)

    def encode_body(
        self,
        flat: Tensor,
        shapes: tuple[tuple[int, ...], ...],
        body: Tensor,
        residual: bool,
        fill: Fill | None = None,
    ) -> None:
        blocks = blocks_of(shapes, self.chunk)
        try:
            if self.scope == "chunk":
                chunk_of, index, value = self.select_per_chunk(flat, blocks, shapes, fill)
            else:
                chunk_of, index = self.select_global(flat, blocks, fill)
                value = flat.index_select(0, chunk_of * self.chunk + index)
        except NotFinite:
            raise_not_finite(blocks.views(flat), self.name)
        position = chunk_of * self.chunk + index  # in the staged buffer
        size = value.abs()
        scales = body[: 8 * blocks.count].view(torch.float32).view(blocks.count, 2)
        torch.zeros(blocks.count, out=scales[:, 0]).scatter_reduce_(
            0, chunk_of, size, "amin", include_self=False
        )
        hi = torch.zeros(blocks.count).scatter_reduce_(0, chunk_of, size, "amax", include_self=False)
        scales[:, 1] = (hi - scales[:, 0]) / 2 ** (self.bits - 1)
        if not bool(torch.isfinite(largest_decoded(scales, 2 ** (self.bits - 1) - 0.5)).all()):
            raise_not_finite(blocks.views(flat), self.name)  # |x| ≈ fp32's max: lo + (L − ½)·step → Inf
        lo, step = scales[chunk_of, 0], scales[chunk_of, 1]
        level = torch.where(step > 0, (size - lo) / step, torch.zeros_like(size))
        level = level.floor_().clamp_(0, 2 ** (self.bits - 1) - 1).to(torch.int64)
        negative = (value < 0).to(torch.int64)
        start = 8 * blocks.count
        if self.scope == "global":
            counts = torch.bincount(chunk_of, minlength=blocks.count)
            packed = pack_bits(counts, self.count_bits)
            body[start : start + packed.numel()] = packed
            start += packed.numel()
        body[start:] = pack_bits((index << self.bits) | (negative << (self.bits - 1)) | level, self.width)
        if residual:  # a − decode(m): only the kept entries change
            flat[position] = value - dequantize(level, negative, lo, step)

    def select_per_chunk(
        self, flat: Tensor, blocks: Blocks, shapes: tuple[tuple[int, ...], ...], fill: Fill | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(chunk, index in chunk, value) of each kept entry, chunk after chunk, indices
        increasing; a tile of chunks at a time (each chunk's selection is its own), the values read
        while the tile is in the cache."""
        group = group_size(self.chunk, self.k, self.chunk)
        index = torch.empty(blocks.count, self.k, dtype=torch.int64)
        value = torch.empty(blocks.count, self.k)
        for start, stop in tiles(flat.numel(), self.chunk):
            if fill is not None:
                fill(start, stop)
            rows = slice(start // self.chunk, stop // self.chunk)
            x = flat[start:stop].view(-1, self.chunk)
            if group > 1:
                index[rows] = top_per_chunk_by_groups(x, blocks.real[rows], self.k, group)
            else:
                index[rows] = top_per_chunk(x, blocks.real[rows], self.k)
            torch.gather(x, 1, index[rows], out=value[rows])
        index, order = index.sort(dim=1)
        value = value.gather(1, order)
        entries = entries_of(shapes, self.chunk, self.k)
        if entries.full:
            return entries.chunk, index.reshape(-1), value.reshape(-1)
        keep = index < blocks.real.unsqueeze(1)  # padding is picked last: dropped
        return entries.chunk, index[keep], value[keep]

    def select_global(self, flat: Tensor, blocks: Blocks, fill: Fill | None) -> tuple[Tensor, Tensor]:
        """(chunk, index in chunk) of the K largest magnitudes over all real elements, chunk after
        chunk, indices increasing."""
        kept = kept_of(self.fraction, blocks.layout.numel)
        group = group_size(self.chunk, kept, flat.numel())
        peaks = torch.empty(blocks.count, self.chunk // group) if group > 1 else None
        for start, stop in tiles(flat.numel(), self.chunk):
            if fill is not None:
                fill(start, stop)
            if peaks is not None:
                rows = slice(start // self.chunk, stop // self.chunk)
                peaks[rows] = group_peaks(flat[start:stop].view(-1, self.chunk), blocks.real[rows], group)
        x = flat.view(blocks.count, self.chunk)
        if peaks is not None:
            position = top_global_by_groups(x, blocks.real, peaks, kept, group)
        else:
            whole = torch.tensor([x.numel()])  # one row: padding is masked by its list of positions
            position = top_per_chunk(x.view(1, -1), whole, kept, blocks.padding)
        position = position.reshape(-1).sort().values
        return position // self.chunk, position % self.chunk

    def read_entries(
        self, body: Tensor, shapes: tuple[tuple[int, ...], ...]
    ) -> tuple[Entries, Tensor, Tensor]:
        """The checked entries of a body: (where they belong, index in chunk, decoded fp32 value)."""
        blocks = blocks_of(shapes, self.chunk)
        count = blocks.count
        levels = 2 ** (self.bits - 1)
        scales = body[: 8 * count].view(torch.float32).view(count, 2)
        check_scales(scales, levels - 0.5, self.name)  # the largest decoded magnitude: lo + (L − ½)·step
        start = 8 * count
        if self.scope == "chunk":
            entries = entries_of(shapes, self.chunk, self.k)
        else:
            nbytes = -(-count * self.count_bits // 8)
            entries = self.global_entries(
                unpack_bits(body[start : start + nbytes], count, self.count_bits), blocks
            )
            start += nbytes
        field = unpack_bits(body[start:], entries.count, self.width)
        index = field >> self.bits
        bad = index >= entries.limit
        if bool(bad.any()):
            e = int(bad.nonzero()[0, 0])
            raise MalformedMessage(
                f"topk entry {e} has index {int(index[e])}, out of range for its chunk of "
                f"{int(entries.limit[e])} elements"
            )
        if not bool(((index[1:] > index[:-1]) | ~entries.same_chunk_as_next).all()):
            raise MalformedMessage("topk indices are not strictly increasing within a chunk (repeated entry)")
        negative = (field >> (self.bits - 1)) & 1
        lo, step = scales[entries.chunk, 0], scales[entries.chunk, 1]
        return entries, index, dequantize(field & (levels - 1), negative, lo, step)

    def global_entries(self, counts: Tensor, blocks: Blocks) -> Entries:
        """Where the entries of a global-scope message belong, from its per-chunk counts (checked:
        each at most its chunk's real elements, K in all)."""
        over = counts > blocks.real
        if bool(over.any()):
            j = int(over.nonzero()[0, 0])
            raise MalformedMessage(
                f"topk chunk {j} claims {int(counts[j])} entries, more than its {int(blocks.real[j])} elements"
            )
        kept = kept_of(self.fraction, blocks.layout.numel)
        if int(counts.sum()) != kept:
            raise MalformedMessage(f"topk chunk counts add up to {int(counts.sum())} entries, not K = {kept}")
        return entries_from_counts(blocks, counts.to(torch.int64), full=False)

    def decoded_views(self, body: Tensor, shapes: tuple[tuple[int, ...], ...]) -> list[Tensor]:
        entries, index, value = self.read_entries(body, shapes)
        # a zero buffer but for the entries written by the previous decode: clear those, write these
        x, new = self.workspace("decode", entries.blocks.count * self.chunk)
        if not new:
            x[self.written] = 0.0
        self.written = entries.start + index
        x[self.written] = value
        return entries.blocks.views(x)

    def decode(self, message: EncodedMessage | Tensor, out: Sequence[Tensor]) -> None:
        """Into contiguous ``out`` directly: zero it (a write-only pass) and write the kept entries;
        through a scratch copy for tensors that are not contiguous."""
        if not all(isinstance(t, Tensor) and t.is_contiguous() for t in out):
            return super().decode(message, out)
        shapes = shapes_of(out, "out")
        entries, index, value = self.read_entries(self.checked_body(message, shapes), shapes)
        position = (entries.offset_in_tensor + index).split(entries.per_tensor)
        for t, p, v in zip(out, position, value.split(entries.per_tensor), strict=True):
            t.zero_()
            t.view(-1)[p] = v.to(t.dtype)

    def subtract_decoded(self, message: EncodedMessage | Tensor, tensors: Sequence[Tensor]) -> None:
        """``tensors -= decode(message)`` touching only the kept entries (a dense pass only for
        tensors that are not contiguous)."""
        if not all(isinstance(t, Tensor) and t.is_contiguous() for t in tensors):
            return super().subtract_decoded(message, tensors)
        shapes = shapes_of(tensors, "tensors")
        entries, index, value = self.read_entries(self.checked_body(message, shapes), shapes)
        position = (entries.offset_in_tensor + index).split(entries.per_tensor)
        for t, p, v in zip(tensors, position, value.split(entries.per_tensor), strict=True):
            if p.numel():
                t.view(-1).index_add_(0, p, v.to(t.dtype), alpha=-1)
