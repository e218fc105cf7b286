"""What a worker's round sends: the message (``Outgoing``), what encodes it (``Encoder``), its size,
and the transport buffers Δ may be written into directly (``usable_send_buffers``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Encoder(Protocol):
    """Turns Δ into a message: a ``heloco.codecs`` codec, or its ``ErrorFeedback`` (which also has
    ``state_dict``/``load_state_dict``, checkpointed with the worker)."""

    def encode(self, tensors: Sequence[torch.Tensor]) -> Any: ...


@dataclass
class Outgoing:
    """One round's message, between ``outgoing()`` and ``send()``: Δ as tensors, or encoded
    (``message``), computed from parameters of ``base_version``; ``nbytes``: its size on the wire."""

    base_version: int
    nbytes: int
    pseudo_grads: list[torch.Tensor] | None = None
    message: Any = None


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors' elements (a message of them, uncompressed)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def usable_send_buffers(
    buffers: Any, start: list[torch.Tensor], now: list[torch.Tensor]
) -> list[torch.Tensor] | None:
    """The transport's send buffers if Δ can be written into them as is: one contiguous floating
    tensor per parameter, same shape and device, not overlapping the parameters or θ_start."""
    if not isinstance(buffers, list | tuple) or len(buffers) != len(start):
        return None
    for b, s, p in zip(buffers, start, now, strict=True):
        if (
            not isinstance(b, torch.Tensor)
            or not b.is_floating_point()
            or b.shape != s.shape
            or b.device != s.device
            or b.device != p.device
            or not b.is_contiguous()
            or b.data_ptr() in (s.data_ptr(), p.data_ptr())
        ):
            return None
    return list(buffers)


def copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all i: one foreach kernel for plain tensors, one copy each for
    tensor subclasses without a foreach rule (FSDP2's DTensor shards)."""
    if all(type(t) is torch.Tensor for t in (*dst[:1], *src[:1])):
        torch._foreach_copy_(dst, src)
        return
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)
