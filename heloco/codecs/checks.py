"""Checks shared by the codecs: what they accept as tensors, what they refuse to encode (NaN, Inf, a
value the codec cannot represent) and to decode (scales that are not finite or would decode to
non-finite values), so that every codec words its errors alike."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from heloco.codecs.wire import MalformedMessage


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
