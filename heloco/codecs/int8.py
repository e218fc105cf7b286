"""Blockwise absmax int8: ≈3.94× fewer bytes than fp32 at blocks of 256, an error of at most half a
block's scale per element."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from heloco.codecs.base import Codec
from heloco.codecs.checks import check_int, check_scales, largest_decoded, raise_not_finite, shapes_of
from heloco.codecs.layout import Blocks, Staging, blocks_of, layout_of
from heloco.codecs.tiling import Fill, longest_tile, tiles
from heloco.codecs.wire import CODEC_IDS, EncodedMessage, MalformedMessage

MAX_BLOCK = 2**24  # int8 block size


class Int8Codec(Codec):
    """Blockwise absmax int8 (INTELLECT-1, arXiv 2412.01152, sent its pseudo-gradients in int8).

    Each tensor is cut into blocks of ``block`` elements (B); block j has scale s_j = max|x|/127
    (fp32) and q = round(x/s_j) ∈ [−127, 127], decoded as q·s_j, so the error is ≤ s_j/2 per
    element. Body: the N_b fp32 scales, then the n int8 values in the order of the tensors:
    32 + n + 4·N_b bytes, N_b = Σ_i ⌈n_i/B⌉ (≈ 4/(1 + 4/B) = 3.94× fewer than fp32 at B = 256).
    fp32 scales, not fp16: a pseudo-gradient's entries can be ~1e-7, below fp16's normal range.
    """

    name = "int8"
    codec_id = CODEC_IDS["int8"]

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
        scratch = self.workspace("scratch", longest_tile(flat.numel()))[0]
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
