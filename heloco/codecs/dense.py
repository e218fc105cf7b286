"""The dense codecs, every element on the wire in a floating dtype: fp32 (lossless, the reference
for byte ratios) and bf16 (2× fewer bytes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from heloco.codecs.base import Codec
from heloco.codecs.checks import all_finite, raise_not_finite, shapes_of
from heloco.codecs.layout import layout_of
from heloco.codecs.tiling import Fill, longest_tile, tiles
from heloco.codecs.wire import CODEC_IDS, HEADER_BYTES, EncodedMessage, MalformedMessage


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
        sent = self.workspace("sent", longest_tile(flat.numel()))[0] if roundtrip else None
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
    codec_id = CODEC_IDS["fp32"]
    lossless = True
    wire_dtype = torch.float32


class BF16Codec(DenseCodec):
    """bf16, rounded to nearest even: relative error ≤ 2⁻⁸ per element, fp32's range (32 + 2n bytes)."""

    name = "bf16"
    codec_id = CODEC_IDS["bf16"]
    wire_dtype = torch.bfloat16
