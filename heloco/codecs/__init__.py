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

Modules, one job each: ``wire`` (header, ``EncodedMessage``, ``MalformedMessage``), ``bits``
(bit packing), ``layout`` (shapes, staging, blocks), ``tiling`` (tiles and error feedback's fill),
``checks`` (what is refused and how it is worded), ``base`` (``Codec``), ``dense`` (fp32, bf16),
``int8``, ``topk`` and its ``selection``, ``feedback`` (``ErrorFeedback``), ``registry``
(``make_codec``). This package re-exports their public API.
"""

from heloco.codecs.base import Codec
from heloco.codecs.bits import pack_bits, unpack_bits
from heloco.codecs.dense import BF16Codec, FP32Codec
from heloco.codecs.feedback import ErrorFeedback
from heloco.codecs.int8 import Int8Codec
from heloco.codecs.layout import Staging
from heloco.codecs.registry import CODEC_NAMES, make_codec
from heloco.codecs.topk import TOPK_SCOPES, TopKCodec
from heloco.codecs.wire import HEADER_BYTES, CodecHeader, EncodedMessage, MalformedMessage, read_header

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
