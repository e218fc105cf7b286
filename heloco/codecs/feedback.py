"""Worker-side error feedback: what a lossy codec drops is kept in a residual and added to the next
Δ, so that it is delayed rather than lost."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from heloco.codecs.base import Codec
from heloco.codecs.checks import all_finite, shapes_of
from heloco.codecs.tiling import tile_filler
from heloco.codecs.wire import EncodedMessage


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
