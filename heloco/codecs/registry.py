"""The codecs by name, and ``make_codec``: how a config (``{"name": ..., **options}``) becomes a
codec, the same on a worker and on the server."""

from __future__ import annotations

from typing import Any

from heloco.codecs.base import Codec
from heloco.codecs.dense import BF16Codec, FP32Codec
from heloco.codecs.int8 import Int8Codec
from heloco.codecs.topk import TopKCodec

CODECS: dict[str, type[Codec]] = {c.name: c for c in (FP32Codec, BF16Codec, Int8Codec, TopKCodec)}
CODEC_NAMES = tuple(CODECS)
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
