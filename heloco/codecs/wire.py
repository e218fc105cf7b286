"""The message format, shared by every codec: one flat ``torch.uint8`` payload, a fixed header (magic,
format version, codec id, the codec's parameters, the layout's size and a CRC32 of its shapes), then
the codec's body. A module of its own because a transport needs only this to frame and check a
message, whatever the codec."""

from __future__ import annotations

import dataclasses
import struct

import torch
from torch import Tensor

MAGIC = b"HLCZ"
FORMAT_VERSION = 1
# magic, format version, codec id, bits, reserved, tensors, elements, block/chunk, k, CRC32 of the shapes
HEADER = struct.Struct("<4sBBBBIQIII")
HEADER_BYTES = HEADER.size  # 32: the body starts aligned for fp32 views
# The id each codec writes into its headers, by the name a refusal reports (global top-k has its own,
# so that a decoder of one top-k scope refuses the other's messages).
CODEC_IDS = {"fp32": 1, "bf16": 2, "int8": 3, "topk": 4, "topk (global scope)": 5}


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


def write_header(payload: Tensor, header: CodecHeader) -> None:
    """Write ``header`` (magic and format version added) into the first ``HEADER_BYTES`` of ``payload``."""
    packed = HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        header.codec_id,
        header.bits,
        0,
        header.num_tensors,
        header.numel,
        header.block,
        header.k,
        header.shapes_crc,
    )
    payload[:HEADER_BYTES] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)


def codec_name_of(codec_id: int) -> str:
    """The codec whose messages carry ``codec_id`` ("unknown" for an id no codec writes)."""
    return next((name for name, known in CODEC_IDS.items() if known == codec_id), "unknown")
