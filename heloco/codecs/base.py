"""The interface every codec implements (``Codec``) and what they share: the header written and
checked, the payload buffer, the staged encode, decode into ``out`` only once every check passed,
and scratch buffers kept between calls."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from heloco.codecs.checks import shapes_of
from heloco.codecs.layout import Layout, Staging, layout_of, staging_of
from heloco.codecs.tiling import Fill, tile_filler
from heloco.codecs.wire import (
    HEADER_BYTES,
    CodecHeader,
    EncodedMessage,
    MalformedMessage,
    as_payload,
    codec_name_of,
    read_header,
    write_header,
)


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
        header = CodecHeader(self.codec_id, bits, len(shapes), layout.numel, block, k, layout.crc)
        write_header(payload, header)
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
            sender = codec_name_of(header.codec_id)
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
