"""Codecs for pseudo-gradients on the wire: fp32, bf16, blockwise int8 and chunked top-k with 2..8-bit
values, plus the worker-side error feedback that makes the lossy ones converge.

Why: a DiLoCo round already sends Δ only every H inner steps; compressing Δ itself cuts the bytes again
by 2× (bf16), ~4× (int8, as INTELLECT-1 did for its pseudo-gradients, arXiv 2412.01152) or >100× (top-k
of 1-3% of the entries in 2 bits with error feedback, as SparseLoCo, arXiv 2508.15706, which reports
>146×). What a lossy codec drops is not lost: ``ErrorFeedback`` keeps it in a residual and adds it to
the next Δ (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD",
arXiv 1901.09847).

One message is ONE flat ``torch.uint8`` tensor, exactly the bytes on the wire, so a transport sends it
with one send (CPU tensors; multi-byte fields in the host's byte order, little-endian on x86 and ARM):

    header (HEADER_BYTES = 32)  |  body (codec-specific)

The header holds a magic, a format version, the codec id, the codec's parameters (bits, block or
chunk size, k), the number of tensors, their total number of elements and a CRC32 of their shapes,
so a decoder refuses (``MalformedMessage``) a message that does not match its own settings or the
layout of the tensors it decodes into. With n_i the elements of tensor i and n = Σ n_i, the exact
sizes (``max_nbytes(shapes)`` equals every message's ``nbytes``: they depend on the layout only):

    fp32   32 + 4n                                            (raw; the reference)
    bf16   32 + 2n                                            (round to nearest even: 2×)
    int8   32 + n + 4·N_b,  N_b = Σ_i ⌈n_i / B⌉               (B = 256: ≈3.94×)
    topk   32 + 8·N_c + ⌈E·(⌈log2 C⌉ + b) / 8⌉,  N_c = Σ_i ⌈n_i / C⌉,  E = Σ_chunks min(k, m_j)
    topk, scope="global"  (the K = min(n, ⌈f·n⌉) largest over all n, c_j of them in chunk j)
           32 + 8·N_c + ⌈N_c·(⌊log2 C⌋ + 1) / 8⌉ + ⌈K·(⌈log2 C⌉ + b) / 8⌉

Blocks (int8) and chunks (top-k) never straddle two tensors: each tensor is cut on its own, its last
block possibly shorter (m_j real elements), so a tensor's scale never depends on a neighbour's
magnitude. For top-k with fraction f, k = ⌈f·C⌉; at f = 1%, C = 4096, b = 2: k = 41 entries of
12 + 2 = 14 bits (1.75 bytes) plus 8 bytes of scales per chunk, 79.75 bytes instead of 16384:
≈205× fewer bytes than fp32 on whole chunks (≈1.95 bytes per kept entry).

Use (worker and server each build their own codec from the same config)::

    codec = make_codec("topk", fraction=0.01, bits=2)             # or "fp32", "bf16", "int8"
    wire = torch.empty(codec.max_nbytes(shapes), dtype=torch.uint8)  # once
    ef = ErrorFeedback(codec)                                      # worker
    message = ef.encode(deltas, out=wire)                          # send message.payload
    codec.decode(received_payload, out=pseudo_grads)               # server: fp32 tensors

A codec keeps model-sized scratch buffers between calls: on CPU, allocating and first touching tens of
MB costs more than the arithmetic on them. Speed comes from few passes over whole-model flat buffers:
``Codec.staging(shapes)`` is the flat fp32 layout a codec encodes from (each tensor at an offset, its
last block or chunk zero-padded), ``encode_staged(flat, shapes, residual=True)`` encodes it and
leaves ``flat − decode(message)`` in place from the values the encoder computed anyway, which is
how ``ErrorFeedback`` runs a round in a handful of vectorised passes; and encoders work a tile of
``TILE`` elements at a time, error feedback's Δ + β·e written into the tile just before
(``tile_filler``), so those passes read it from the cache rather than from memory.
"""

from __future__ import annotations

import abc
import bisect
import dataclasses
import functools
import itertools
import math
import numbers
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "CODEC_NAMES",
    "HEADER_BYTES",
    "TOPK_SCOPES",
    "BF16Codec",
    "Codec",
    "CodecHeader",
    "EncodedMessage",
    "ErrorFeedback",
    "FP32Codec",
    "Int8Codec",
    "MalformedMessage",
    "Staging",
    "TopKCodec",
    "make_codec",
    "pack_bits",
    "read_header",
    "unpack_bits",
]

MAGIC = b"HLCZ"
FORMAT_VERSION = 1
# magic, format version, codec id, bits, reserved, tensors, elements, block/chunk, k, CRC32 of the shapes
HEADER = struct.Struct("<4sBBBBIQIII")
HEADER_BYTES = HEADER.size  # 32: the body starts aligned for fp32 views
MAX_BLOCK = 2**24  # int8 block size
MAX_CHUNK = 2**16  # top-k chunk size: index ≤ 16 bits, an entry's field ≤ 24 bits (int32 arithmetic)
# Encoders work through the staged buffer a tile at a time: the tile's passes (Δ + β·e, then the
# codec's) reuse it from the cache instead of streaming the whole model from memory once per pass.
TILE = 2**18  # elements (1 MiB of fp32)

Fill = Callable[[int, int], None]  # writes the values to encode into flat[start:stop]


def tiles(numel: int, unit: int, share: int = 1) -> list[tuple[int, int]]:
    """[start, stop) ranges of whole units (blocks, chunks) covering ``numel`` elements, each about
    ``TILE / share`` elements long (``TILE`` read when called, so a test can shrink it): an encoder
    keeping several tile-sized buffers at once takes a share so that they all stay in the cache."""
    step = max(1, TILE // share // unit) * unit
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


class MalformedMessage(ValueError):
    """A payload the decoder refuses: wrong magic, codec or settings, a layout other than the tensors it
    would be decoded into, a wrong length, an index out of range, or values or scales not finite."""


@dataclasses.dataclass(frozen=True)
class CodecHeader:
    """The fixed header at the start of every payload."""

    codec_id: int
    bits: int
    num_tensors: int
    numel: int
    block: int
    k: int
    shapes_crc: int


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedMessage:
    """One encoded message: ``payload`` is exactly the bytes on the wire (1-D ``torch.uint8``)."""

    payload: Tensor

    @property
    def nbytes(self) -> int:
        return self.payload.numel()


def read_header(payload: EncodedMessage | Tensor) -> CodecHeader:
    """Parse and check the fixed header of a payload (magic, format version); ``MalformedMessage`` if
    it is not one."""
    payload = as_payload(payload)
    if payload.numel() < HEADER_BYTES:
        raise MalformedMessage(
            f"truncated message: {payload.numel()} bytes, shorter than the {HEADER_BYTES}-byte header"
        )
    magic, version, codec_id, bits, reserved, *rest = HEADER.unpack(bytes(payload[:HEADER_BYTES].tolist()))
    if magic != MAGIC:
        raise MalformedMessage(f"not a codec message: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION or reserved != 0:
        raise MalformedMessage(
            f"unknown message format version {version} (reserved byte {reserved}); this decoder reads "
            f"version {FORMAT_VERSION}"
        )
    return CodecHeader(codec_id, bits, *rest)


def as_payload(message: EncodedMessage | Tensor) -> Tensor:
    """The payload of a message, or a received byte tensor, checked to be a 1-D CPU uint8 tensor and
    copied once if its start is not aligned for fp32 views."""
    payload = message.payload if isinstance(message, EncodedMessage) else message
    if not isinstance(payload, Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        what = (
            f"{payload.dtype} tensor of shape {tuple(payload.shape)}" if isinstance(payload, Tensor) else ""
        )
        raise MalformedMessage(
            f"a message payload must be a 1-D torch.uint8 tensor, got {what or type(payload).__name__}"
        )
    if payload.device.type != "cpu":
        raise MalformedMessage(f"a message payload must be on the CPU, got {payload.device}")
    if not payload.is_contiguous() or payload.storage_offset() % 8:
        payload = payload.clone()
    return payload


# ---------------------------------------------------------------------------------------------------
# Bit packing (vectorised: no Python loop over entries)


def pack_bits(values: Tensor, width: int) -> Tensor:
    """Pack non-negative integers < 2**width (width ≤ 31) into ⌈len·width/8⌉ bytes, least
    significant bit first: bit j of value i is bit (i·width + j) of the stream, and bit t of the
    stream is bit t mod 8 of byte ⌊t/8⌋. Trailing bits of the last byte are 0.

    Vectorised over the values, not their bits: value i lands at bit s = (i·width) mod 32 of 32-bit
    word ⌊i·width/32⌋, its low 32 − s bits there and the rest in the next word (v·2^s < 2^62 fits
    int64; bits never overlap, so adding them is or-ing them)."""
    count = values.numel()
    nbytes = -(-count * width // 8)
    position = torch.arange(count, dtype=torch.int64) * width
    shifted = values.reshape(-1).to(torch.int64) << (position & 31)
    words = torch.zeros(-(-nbytes // 4) + 1, dtype=torch.int64)
    words.index_add_(0, position >> 5, shifted & 0xFFFFFFFF)
    words.index_add_(0, (position >> 5) + 1, shifted >> 32)
    return ((words[:-1].unsqueeze(1) >> BYTE_SHIFTS) & 0xFF).to(torch.uint8).view(-1)[:nbytes]


def unpack_bits(data: Tensor, count: int, width: int) -> Tensor:
    """The ``count`` integers of ``width`` bits that ``pack_bits`` wrote into ``data`` (int32)."""
    if data.numel() * 8 < count * width:
        raise MalformedMessage(f"truncated bit stream: {data.numel()} bytes for {count} × {width} bits")
    padded = torch.zeros(-(-data.numel() // 4) * 4 + 4, dtype=torch.int64)
    padded[: data.numel()] = data
    words = (padded.view(-1, 4) << BYTE_SHIFTS).sum(1)  # little-endian 32-bit words, one spare
    position = torch.arange(count, dtype=torch.int64) * width
    word = position >> 5
    # bits s .. s + width − 1 ≤ 61 of (word + next word · 2^32): the next word's low 30 bits suffice
    pair = words[word] | ((words[word + 1] & 0x3FFFFFFF) << 32)
    return ((pair >> (position & 31)) & ((1 << width) - 1)).to(torch.int32)


BYTE_SHIFTS = torch.tensor([0, 8, 16, 24], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------
# Layouts (cached per list of shapes)


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


def shapes_of(tensors: Any, what: str) -> tuple[tuple[int, ...], ...]:
    """The shapes of a non-empty list of floating-point CPU tensors (``ValueError`` naming ``what``)."""
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence) or not tensors:
        raise ValueError(f"{what} must be a non-empty list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise ValueError(f"{what}[{i}] is a {type(t).__name__}, expected a torch.Tensor")
        if not t.is_floating_point():
            raise ValueError(f"{what}[{i}] has dtype {t.dtype}, expected a floating-point dtype")
        if t.device.type != "cpu":
            raise ValueError(f"{what}[{i}] is on {t.device}; codecs work on CPU tensors (the wire is CPU)")
    return tuple(tuple(t.shape) for t in tensors)


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf. A sum is one fast vectorised pass and is finite whenever
    every value is (NaN and Inf propagate); only a non-finite sum, which finite values that overflow
    can also give, is checked again value by value (``aminmax``)."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def raise_not_finite(tensors: Sequence[Tensor], codec: str) -> None:
    """Name the first tensor holding NaN or Inf (or say the values overflow the codec's range)."""
    for i, t in enumerate(tensors):
        if not all_finite(t):
            raise ValueError(f"cannot encode tensors[{i}] with {codec}: it contains NaN or Inf")
    raise ValueError(f"cannot encode with {codec}: a value overflows the codec's range")


# ---------------------------------------------------------------------------------------------------
# Codecs


class Codec(abc.ABC):
    """Common interface. ``encode`` turns a list of tensors into one ``EncodedMessage``; ``decode``
    checks a message against this codec and the shapes of ``out`` and writes the fp32 values into
    ``out`` (only once every check passed: a refused message leaves ``out`` as it was).

    A codec keeps model-sized scratch buffers between calls (allocating and first touching tens of
    MB costs more than the arithmetic on them), so one instance serves one encode or decode at a
    time: give each thread its own.
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    lossless: ClassVar[bool] = False  # decode(encode(x)) == x: error feedback's residual stays 0

    def __init__(self) -> None:
        self.workspaces: dict[str, Tensor] = {}

    def workspace(self, key: str, numel: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, bool]:
        """The scratch buffer ``key`` of ``numel`` elements (zeros when new); and whether it is new."""
        buf = self.workspaces.get(key)
        if buf is not None and buf.numel() == numel and buf.dtype == dtype:
            return buf, False
        self.workspaces[key] = buf = torch.zeros(numel, dtype=dtype)
        return buf, True

    def options(self) -> dict[str, int | float]:
        """The codec's settings, as ``make_codec`` takes them."""
        return {}

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **options}``: ``make_codec(**codec.config())`` builds an equal codec."""
        return {"name": self.name, **self.options()}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    def header_params(self, numel: int) -> tuple[int, int, int]:
        """(bits, block or chunk size, k) as the header records them for ``numel`` elements (0
        where unused)."""
        return 0, 0, 0

    def max_nbytes(self, shapes: Sequence[Sequence[int]]) -> int:
        """Bytes of a message for tensors of these shapes (an upper bound to preallocate a wire
        buffer; for these codecs exactly every such message's ``nbytes``)."""
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        return HEADER_BYTES + self.body_nbytes(shapes)

    def staging(self, shapes: Sequence[Sequence[int]]) -> Staging:
        """The flat fp32 layout ``encode_staged`` reads: each tensor at its offset, its last block
        or chunk padded with zeros (dense codecs: the tensors back to back)."""
        return staging_of(tuple(tuple(int(d) for d in s) for s in shapes), 1)

    def encode(self, tensors: Sequence[Tensor], out: Tensor | None = None) -> EncodedMessage:
        """Encode ``tensors`` (floating point, CPU) into one payload, written into ``out[:nbytes]``
        when a preallocated uint8 buffer is given. ``ValueError`` if a value is NaN or Inf."""
        shapes = shapes_of(tensors, "tensors")
        staging = self.staging(shapes)
        flat = self.workspace("stage", staging.numel)[0]  # its padding is never written: zero
        return self.encode_staged(flat, shapes, out, fill=tile_filler(flat, staging, tensors))

    def encode_staged(
        self,
        flat: Tensor,
        shapes: Sequence[Sequence[int]],
        out: Tensor | None = None,
        residual: bool = False,
        fill: Fill | None = None,
    ) -> EncodedMessage:
        """Encode tensors of ``shapes`` laid out in ``flat`` as ``staging(shapes)`` says (fp32,
        padding zero). With ``fill``, ``flat`` is written a tile at a time, ``fill(start, stop)``
        just before the encoder reads ``flat[start:stop]``, so both passes meet in the cache. With
        ``residual``, ``flat`` becomes ``flat − decode(message)`` (bit for bit what the decoder
        gives, padding still zero): error feedback's residual, from what the encoder computed anyway
        rather than from a second decode. ``ValueError`` if a value is NaN or Inf; ``flat`` may then
        be partly overwritten (error feedback passes a scratch buffer it only keeps on success)."""
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        staging = self.staging(shapes)
        if flat.dtype != torch.float32 or flat.dim() != 1 or flat.numel() != staging.numel:
            raise ValueError(
                f"flat must be a 1-D fp32 tensor of {staging.numel} elements (staging(shapes)), got "
                f"{flat.dtype} of shape {tuple(flat.shape)}"
            )
        payload = self.start_message(shapes, out)
        self.encode_body(flat, shapes, payload[HEADER_BYTES:], residual, fill)
        return EncodedMessage(payload)

    def start_message(self, shapes: tuple[tuple[int, ...], ...], out: Tensor | None) -> Tensor:
        """The payload buffer of a message for these shapes (``out[:nbytes]`` or a new one), its
        header written."""
        payload = self.payload_buffer(out, HEADER_BYTES + self.body_nbytes(shapes))
        layout = layout_of(shapes)
        bits, block, k = self.header_params(layout.numel)
        header = HEADER.pack(
            MAGIC, FORMAT_VERSION, self.codec_id, bits, 0, len(shapes), layout.numel, block, k, layout.crc
        )
        payload[:HEADER_BYTES] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        return payload

    def decode(self, message: EncodedMessage | Tensor, out: Sequence[Tensor]) -> None:
        """Check ``message`` (or a received payload) and write its values into ``out`` (tensors of
        the original shapes). ``MalformedMessage`` names what is wrong."""
        shapes = shapes_of(out, "out")
        torch._foreach_copy_(list(out), self.decoded_views(self.checked_body(message, shapes), shapes))

    def subtract_decoded(self, message: EncodedMessage | Tensor, tensors: Sequence[Tensor]) -> None:
        """``tensors -= decode(message)``, checked like ``decode``: error feedback's residual update,
        without a model-sized copy of the decoded values."""
        shapes = shapes_of(tensors, "tensors")
        torch._foreach_sub_(list(tensors), self.decoded_views(self.checked_body(message, shapes), shapes))

    def checked_body(self, message: EncodedMessage | Tensor, shapes: tuple[tuple[int, ...], ...]) -> Tensor:
        """The body of ``message`` once its header and length match this codec and these shapes."""
        payload = as_payload(message)
        self.check_header(read_header(payload), layout_of(shapes))
        expected = HEADER_BYTES + self.body_nbytes(shapes)
        if payload.numel() != expected:
            kind = "truncated" if payload.numel() < expected else "oversized"
            raise MalformedMessage(
                f"{kind} message: {payload.numel()} bytes, the {self.name} layout of out needs {expected}"
            )
        return payload[HEADER_BYTES:]

    def check_header(self, header: CodecHeader, layout: Layout) -> None:
        if header.codec_id != self.codec_id:
            sender = CODEC_NAME_OF_ID.get(header.codec_id, "unknown")
            raise MalformedMessage(
                f"message was encoded by codec {sender!r} (id {header.codec_id}), this decoder is "
                f"{self.name!r} (id {self.codec_id})"
            )
        got = (header.bits, header.block, header.k)
        expected = self.header_params(layout.numel)
        if got != expected:
            raise MalformedMessage(
                f"message has (bits, block, k) = {got}, this {self.name} decoder expects {expected}"
            )
        if header.num_tensors != len(layout.shapes):
            raise MalformedMessage(
                f"message holds {header.num_tensors} tensors, out has {len(layout.shapes)}"
            )
        if header.numel != layout.numel:
            raise MalformedMessage(f"message holds {header.numel} elements, out has {layout.numel}")
        if header.shapes_crc != layout.crc:
            raise MalformedMessage("message's tensor shapes differ from out's (CRC32 of the shapes)")

    @staticmethod
    def payload_buffer(out: Tensor | None, nbytes: int) -> Tensor:
        if out is None:
            return torch.empty(nbytes, dtype=torch.uint8)
        ok = (
            isinstance(out, Tensor)
            and out.dtype == torch.uint8
            and out.dim() == 1
            and out.device.type == "cpu"
            and out.is_contiguous()
            and out.storage_offset() % 8 == 0
            and out.numel() >= nbytes
        )
        if not ok:
            raise ValueError(
                f"out must be a contiguous 1-D CPU torch.uint8 buffer of at least {nbytes} bytes, "
                "starting 8-byte aligned (see max_nbytes)"
            )
        return out[:nbytes]

    @abc.abstractmethod
    def body_nbytes(self, shapes: tuple[tuple[int, ...], ...]) -> int:
        """Bytes after the header for tensors of these shapes."""

    @abc.abstractmethod
    def encode_body(
        self,
        flat: Tensor,
        shapes: tuple[tuple[int, ...], ...],
        body: Tensor,
        residual: bool,
        fill: Fill | None = None,
    ) -> None:
        """Write the body from the staged ``flat`` (see ``encode_staged``: ``fill`` each tile
        first; with ``residual``, leave ``flat − decode`` in ``flat``); raise ``ValueError`` on a
        non-finite value."""

    @abc.abstractmethod
    def decoded_views(self, body: Tensor, shapes: tuple[tuple[int, ...], ...]) -> list[Tensor]:
        """Check the body (``MalformedMessage``); return the decoded tensors (views of the body or
        of a workspace, valid until the next call)."""


class DenseCodec(Codec):
    """Every element in a floating dtype of the wire, back to back in the order of the tensors."""

    wire_dtype: ClassVar[torch.dtype]

    def body_nbytes(self, shapes: tuple[tuple[int, ...], ...]) -> int:
        return layout_of(shapes).numel * self.wire_dtype.itemsize

    def encode(self, tensors: Sequence[Tensor], out: Tensor | None = None) -> EncodedMessage:
        """Copy ``tensors`` straight into the wire: one pass, no staging copy."""
        shapes = shapes_of(tensors, "tensors")
        payload = self.start_message(shapes, out)
        wire = payload[HEADER_BYTES:].view(self.wire_dtype)
        torch._foreach_copy_(layout_of(shapes).views(wire), list(tensors))
        if not all_finite(wire):
            raise_not_finite(tensors, self.name)
        return EncodedMessage(payload)

    def encode_body(
        self,
        flat: Tensor,
        shapes: tuple[tuple[int, ...], ...],
        body: Tensor,
        residual: bool,
        fill: Fill | None = None,
    ) -> None:
        wire = body.view(self.wire_dtype)
        roundtrip = residual and not self.lossless
        sent = self.workspace("sent", min(TILE, flat.numel()))[0] if roundtrip else None
        for start, stop in tiles(flat.numel(), 1, share=4):  # a, the wire and its round trip
            if fill is not None:
                fill(start, stop)
            a, w = flat[start:stop], wire[start:stop]
            w.copy_(a)
            # the round trip in a cached fp32 scratch (mixed dtypes are slow), w's values summed faster
            back = w if sent is None else sent[: stop - start].copy_(w)
            if not all_finite(back):  # before this tile is touched: the tensors' values name the culprit
                raise_not_finite(self.staging(shapes).views(flat), self.name)
            if sent is not None:
                a.sub_(back)  # a − decode(m)
        if residual and self.lossless:
            flat.zero_()

    def decoded_views(self, body: Tensor, shapes: tuple[tuple[int, ...], ...]) -> list[Tensor]:
        wire = body.view(self.wire_dtype)
        if not all_finite(wire):
            raise MalformedMessage(f"{self.name} message holds NaN or Inf values")
        return layout_of(shapes).views(wire)


class FP32Codec(DenseCodec):
    """Raw fp32: lossless, the reference for byte ratios (32 + 4n bytes)."""

    name = "fp32"
    codec_id = 1
    lossless = True
    wire_dtype = torch.float32


class BF16Codec(DenseCodec):
    """bf16, rounded to nearest even: relative error ≤ 2⁻⁸ per element, fp32's range (32 + 2n bytes)."""

    name = "bf16"
    codec_id = 2
    wire_dtype = torch.bfloat16


class Int8Codec(Codec):
    """Blockwise absmax int8 (INTELLECT-1, arXiv 2412.01152, sent its pseudo-gradients in int8).

    Each tensor is cut into blocks of ``block`` elements (B); block j has scale s_j = max|x|/127
    (fp32) and q = round(x/s_j) ∈ [−127, 127], decoded as q·s_j, so the error is ≤ s_j/2 per
    element. Body: the N_b fp32 scales, then the n int8 values in the order of the tensors:
    32 + n + 4·N_b bytes, N_b = Σ_i ⌈n_i/B⌉ (≈ 4/(1 + 4/B) = 3.94× fewer than fp32 at B = 256).
    fp32 scales, not fp16: a pseudo-gradient's entries can be ~1e-7, below fp16's normal range.
    """

    name = "int8"
    codec_id = 3

    def __init__(self, block: int = 256) -> None:
        check_int("int8", "block", block, 1, MAX_BLOCK)
        super().__init__()
        self.block = block

    def options(self) -> dict[str, int | float]:
        return {"block": self.block}

    def header_params(self, numel: int) -> tuple[int, int, int]:
        return 8, self.block, 0

    def body_nbytes(self, shapes: tuple[tuple[int, ...], ...]) -> int:
        return layout_of(shapes).numel + 4 * blocks_of(shapes, self.block).count

    def staging(self, shapes: Sequence[Sequence[int]]) -> Staging:
        return blocks_of(tuple(tuple(int(d) for d in s) for s in shapes), self.block).staging

    def encode_body(
        self,
        flat: Tensor,
        shapes: tuple[tuple[int, ...], ...],
        body: Tensor,
        residual: bool,
        fill: Fill | None = None,
    ) -> None:
        blocks = blocks_of(shapes, self.block)
        staging = blocks.staging
        scales = body[: 4 * blocks.count].view(torch.float32)
        wire = body[4 * blocks.count :].view(torch.int8)
        scratch = self.workspace("scratch", min(TILE, flat.numel()))[0]
        for start, stop in tiles(flat.numel(), self.block, share=2):  # a and q
            if fill is not None:
                fill(start, stop)
            rows = slice(start // self.block, stop // self.block)
            x = flat[start:stop].view(-1, self.block)
            q = scratch[: stop - start]
            self.quantize(x, scales[rows], q.view_as(x))
            for i, lo, hi in staging.real_within(start, stop):  # integral floats → int8, unpadded
                at = staging.packed_offsets[i] + lo - staging.offsets[i]
                wire[at : at + hi - lo].copy_(q[lo - start : hi - start])
            if residual:  # decode is float(q) × scale: the same product, then a − it
                x.sub_(q.view_as(x).mul_(scales[rows].unsqueeze(1)))
        if not bool(torch.isfinite(scales).all()):
            raise_not_finite(blocks.views(flat), self.name)
        if not bool(torch.isfinite(largest_decoded(scales, 127.0)).all()):
            raise_not_finite(blocks.views(flat), self.name)  # |x| ≈ fp32's max: 127 × scale → Inf

    @staticmethod
    def quantize(x: Tensor, scales: Tensor, q: Tensor) -> None:
        """Blocks ``x`` (rows) → ``scales`` (max |x|/127) and ``q`` = round(x/scale) as floats. An
        all-zero block has scale 0 and q = 0; a NaN or Inf gives a non-finite scale (the caller
        checks the scales)."""
        absmax = torch.maximum(x.amax(1), x.amin(1).neg_())  # two fast passes; aminmax is slower
        torch.div(absmax, 127.0, out=scales)
        divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
        torch.div(x, divisor.unsqueeze(1), out=q).round_()
        subnormal = (scales > 0) & (scales < torch.finfo(torch.float32).tiny)
        if bool(subnormal.any()):  # an inexact scale: |x|/scale may pass 127.5 (a normal one keeps it
            q.clamp_(-127, 127)  # ≤ 127·(1 + 2⁻²³), which rounds to 127)

    def checked_parts(self, body: Tensor, blocks: Blocks) -> tuple[Tensor, Tensor]:
        """The scales (fp32) and values (int8) of a body, once they are checked."""
        scales = body[: 4 * blocks.count].view(torch.float32)
        check_scales(scales, 127.0, self.name)  # the largest decoded magnitude is 127 × scale
        wire = body[4 * blocks.count :].view(torch.int8)
        if wire.numel() and int(wire.min()) == -128:
            raise MalformedMessage("int8 message holds the value -128, which the encoder never writes")
        return scales, wire

    def decoded_views(self, body: Tensor, shapes: tuple[tuple[int, ...], ...]) -> list[Tensor]:
        blocks = blocks_of(shapes, self.block)
        scales, wire = self.checked_parts(body, blocks)
        x = blocks.pad(blocks.layout.views(wire), self.workspace("decode", blocks.count * self.block)[0])
        return blocks.views(x.mul_(scales.unsqueeze(1)))  # padding: 0 × scale

    def decode(self, message: EncodedMessage | Tensor, out: Sequence[Tensor]) -> None:
        """Into contiguous fp32 ``out`` directly (int8 → fp32, × scale: two passes over ``out``);
        through a scratch copy otherwise."""
        if not all(isinstance(t, Tensor) and t.dtype == torch.float32 and t.is_contiguous() for t in out):
            return super().decode(message, out)
        shapes = shapes_of(out, "out")
        blocks = blocks_of(shapes, self.block)
        scales, wire = self.checked_parts(self.checked_body(message, shapes), blocks)
        for o, w, first in zip(out, blocks.layout.views(wire), blocks.offsets, strict=True):
            self.decode_tensor(o.view(-1), w.view(-1), scales[first // self.block :])

    def decode_tensor(self, out: Tensor, wire: Tensor, scales: Tensor) -> None:
        """One tensor: its whole blocks as a (blocks, B) view, then its shorter last block."""
        whole = out.numel() // self.block
        if whole:
            rows = out[: whole * self.block].view(whole, self.block)
            rows.copy_(wire[: whole * self.block].view(whole, self.block)).mul_(scales[:whole].unsqueeze(1))
        if out.numel() > whole * self.block:
            out[whole * self.block :].copy_(wire[whole * self.block :]).mul_(scales[whole])


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
    codec_id = 4  # chunk scope; global scope messages carry GLOBAL_TOPK_ID

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


TOPK_SCOPES = ("chunk", "global")
GLOBAL_TOPK_ID = 5


def kept_of(fraction: float, numel: int) -> int:
    """⌈fraction·numel⌉ entries, at least 1 and at most numel (0.03 × 100: 3, not 4)."""
    return min(numel, max(1, math.ceil(round(fraction * numel, 9))))


def dequantize(level: Tensor, negative: Tensor, lo: Tensor, step: Tensor) -> Tensor:
    """sign·(lo + (level + ½)·step) in fp32: the decoder's values, and error feedback's, computed
    by this one function so that both agree bit for bit."""
    magnitude = lo + level.to(torch.float32).add_(0.5) * step
    return magnitude * (1 - 2 * negative).to(torch.float32)


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


def largest_decoded(scales: Tensor, top_level: float) -> Tensor:
    """The largest magnitude each block can decode to, computed as the decoder does: int8
    ``top_level`` × scale (1-D scales), top-k lo + ``top_level`` × step ((count, 2) scales)."""
    return scales[:, 0] + top_level * scales[:, 1] if scales.dim() == 2 else top_level * scales


def check_scales(scales: Tensor, top_level: float, codec: str) -> None:
    """Scales must be finite, ≥ 0, and keep every decoded value finite."""
    if not bool(torch.isfinite(scales).all()):
        raise MalformedMessage(f"{codec} message holds a NaN or Inf scale")
    if bool((scales < 0).any()):
        raise MalformedMessage(f"{codec} message holds a negative scale")
    if not bool(torch.isfinite(largest_decoded(scales, top_level)).all()):
        raise MalformedMessage(f"{codec} message's scales overflow fp32 when decoded (non-finite values)")


def check_int(codec: str, field: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{codec} {field} must be an int in [{low}, {high}], got {value!r}")


CODECS: dict[str, type[Codec]] = {c.name: c for c in (FP32Codec, BF16Codec, Int8Codec, TopKCodec)}
CODEC_NAMES = tuple(CODECS)
CODEC_NAME_OF_ID = {c.codec_id: c.name for c in CODECS.values()} | {GLOBAL_TOPK_ID: "topk (global scope)"}
CODEC_OPTIONS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "bf16": (),
    "int8": ("block",),
    "topk": ("fraction", "bits", "chunk", "scope"),
}


def make_codec(name: str, **options: Any) -> Codec:
    """The codec called ``name`` (one of ``CODEC_NAMES``) with its options: int8 ``block``; topk
    ``fraction``, ``bits``, ``chunk``, ``scope``. ``ValueError`` names the bad field and what it accepts."""
    if name not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODEC_NAMES)}; got {name!r}")
    unknown = sorted(set(options) - set(CODEC_OPTIONS[name]))
    if unknown:
        accepted = ", ".join(CODEC_OPTIONS[name]) or "no options"
        raise ValueError(f"codec {name} takes {accepted}; got unknown option(s) {', '.join(unknown)}")
    return CODECS[name](**options)


# ---------------------------------------------------------------------------------------------------
# Error feedback


class ErrorFeedback:
    """Worker-side error feedback around a codec (Seide et al. 2014; Karimireddy et al. 2019;
    SparseLoCo): what the codec dropped is added to the next Δ instead of being lost.

    Per tensor an fp32 residual e (zero at first): a = Δ + β·e; m = codec.encode(a);
    e ← a − decode(m); send m. e is computed from the very values the decoder produces, so it is
    bit for bit the fp32 a − decode(m), and up to that subtraction's rounding (and a's):

        decode(m) + e_new == Δ + β·e_old

    so with β = 1 (``decay``; SparseLoCo decays it, β < 1) the sum of everything decoded by the
    server plus the current residual is exactly the sum of every Δ. A Δ that cannot be encoded
    (NaN or Inf) raises and leaves the residual as it was.

    Speed: a and e are two flat fp32 buffers in the codec's staging layout (``Codec.staging``), so a
    round is one pass for a = Δ + β·e, the codec's passes over a, and e computed in place from what
    the encoder already has (``Codec.encode_staged(residual=True)``); the two buffers swap roles
    every round. A lossless codec (fp32) keeps e = 0 exactly, so nothing is stored and Δ is encoded
    as it is.
    """

    def __init__(self, codec: Codec, decay: float = 1.0) -> None:
        if not isinstance(codec, Codec):
            raise ValueError(f"codec must be a Codec (see make_codec), got {type(codec).__name__}")
        if not (
            isinstance(decay, numbers.Real) and not isinstance(decay, bool) and math.isfinite(decay)
        ) or not (0 < decay <= 1):
            raise ValueError(f"decay must be a number in (0, 1], got {decay!r}")
        self.codec = codec
        self.decay = float(decay)
        self.shapes: tuple[tuple[int, ...], ...] | None = None  # set by the first encode
        self.residual: Tensor | None = None  # flat, staged; None while e = 0
        self.scratch: Tensor | None = None

    @property
    def residuals(self) -> list[Tensor] | None:
        """e per tensor (views of the flat residual; zeros while e = 0); None before the first
        encode."""
        if self.shapes is None:
            return None
        if self.residual is None:
            return [torch.zeros(s) for s in self.shapes]
        return self.codec.staging(self.shapes).views(self.residual)

    def encode(self, deltas: Sequence[Tensor], out: Tensor | None = None) -> EncodedMessage:
        """Encode Δ + β·e (``deltas`` are not modified) and keep what the codec dropped; ``out``:
        an optional preallocated payload buffer, as for ``Codec.encode``."""
        shapes = shapes_of(deltas, "deltas")
        if self.shapes is not None and shapes != self.shapes:
            raise ValueError("deltas are not shaped like the residuals; call reset() for a new model")
        if self.residual is None and self.codec.lossless:
            message = self.codec.encode(deltas, out=out)  # e = 0 stays 0: nothing to add or keep
            self.shapes = shapes
            return message
        staging = self.codec.staging(shapes)
        if self.scratch is None or self.scratch.numel() != staging.numel:
            self.scratch = torch.zeros(staging.numel)  # its padding stays zero
        accumulated = self.scratch
        fill = tile_filler(accumulated, staging, deltas, self.residual, self.decay)  # a = Δ + β·e
        message = self.codec.encode_staged(accumulated, shapes, out=out, residual=True, fill=fill)
        self.shapes = shapes
        self.residual, self.scratch = accumulated, self.residual
        if self.codec.lossless:
            self.residual = None
        return message

    def reset(self) -> None:
        """Forget the residuals (e = 0) and free the buffers."""
        self.shapes = self.residual = self.scratch = None

    def state_dict(self) -> dict[str, Any]:
        """``{"residuals": [...]}`` (copies; ``None`` before the first encode). The codec and
        ``decay`` are settings, not state: they come from the constructor."""
        residuals = self.residuals
        return {"residuals": None if residuals is None else [e.clone() for e in residuals]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore residuals saved by ``state_dict`` (copied to fp32; checked finite)."""
        if not isinstance(state, dict) or "residuals" not in state:
            raise ValueError("state must be a dict with a 'residuals' entry, as state_dict() returns")
        residuals = state["residuals"]
        if residuals is None:
            self.reset()
            return
        shapes = shapes_of(residuals, "residuals")
        for i, r in enumerate(residuals):
            if not all_finite(r.detach()):
                raise ValueError(f"residuals[{i}] contains NaN or Inf")
        staging = self.codec.staging(shapes)
        flat = torch.zeros(staging.numel)
        staging.fill(flat, [r.detach() for r in residuals])
        self.shapes, self.residual, self.scratch = shapes, flat, None
