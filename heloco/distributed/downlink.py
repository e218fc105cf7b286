"""Replies that carry the change of the parameters (``downlink: delta``) on the gloo wire: the
server's copy of what one worker holds (``ReplyEncoder``) and the worker's own (``ReplyDecoder``).

The simulator's ``heloco.transport.DeltaDownlink``, split across the two ends. The reply to worker w
is m = encode(θ − h_w), θ the parameters the server answers and h_w what w holds from its previous
reply; both ends then set h_w ← h_w + decode(m). Decoding is a deterministic function of the bytes,
so the server's h_w and the worker's are bit for bit the same: what a lossy reply dropped is still
in θ − h_w and goes down with the next reply, and the worker stays within one message's error of θ.

A connection starts with nothing held: the first reply to a worker, and the first after it
(re)joined, carries the full parameters (in the wire dtype, fp32 by default), and both ends hold
exactly those values. So nothing of this is checkpointed: a resumed or restarted worker opens a new
connection and starts again from a full reply (distributed resume pulls the global parameters
anyway, it is not a bit-for-bit continuation).

A worker that cannot apply a reply (malformed, oversized, non-finite, a change before any full
reply) leaves its parameters as they were, but the server has already moved its copy on: the two no
longer agree, so the connection is closed (``MalformedReply``, a ``TransportError``); a new one
starts again from a full reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from heloco.codecs import EncodedMessage
from heloco.transport import TransportError, encode_change

__all__ = ["MalformedReply", "ReplyDecoder", "ReplyEncoder"]


class MalformedReply(TransportError):
    """A worker could not apply the server's encoded reply; its connection is closed."""


def _fp32_like(shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    return [torch.empty(tuple(s), dtype=torch.float32) for s in shapes]


class ReplyEncoder:
    """The server's end for one worker: its copy of what the worker holds (``held``, None until a
    full reply went out) and the encoding of each reply against it.

    Args:
        codec: this thread's own ``heloco.codecs`` codec (a codec serves one thread).
        shapes: the parameters' shapes.
    """

    def __init__(self, codec: Any, shapes: Sequence[Sequence[int]]) -> None:
        self.codec = codec
        self.held: list[Tensor] | None = None
        self.change = _fp32_like(shapes)
        self.decoded = _fp32_like(shapes)
        self.storage = _fp32_like(shapes)  # ``held`` lives here once a full reply went out

    def forget(self) -> None:
        """A new connection: the worker holds nothing, its next reply is full."""
        self.held = None

    @property
    def wants_full(self) -> bool:
        """Whether the next reply must carry the full parameters."""
        return self.held is None

    @torch.no_grad()
    def sent_full(self, sent: Sequence[Tensor]) -> None:
        """A full reply went out: the worker holds ``sent`` (the message's own views, so the values
        are those of the wire dtype, exactly what the worker reads)."""
        torch._foreach_copy_(self.storage, list(sent))
        self.held = self.storage

    @torch.no_grad()
    def encode(self, params: Sequence[Tensor], out: Tensor) -> EncodedMessage:
        """Encode θ − h_w into ``out`` (the message's encoded region) and move h_w on by the decoded
        change, as the worker will. ``params`` may live in ``out``'s bytes (the reply views): the
        change is taken before anything is written. ``ValueError`` (the codec's: a non-finite
        change) leaves nothing held, so the next reply is full."""
        if self.held is None:
            raise ValueError("no full reply went out on this connection yet: the next reply must be full")
        try:
            return encode_change(self.codec, params, self.held, self.change, self.decoded, out=out)
        except ValueError:
            self.held = None
            raise


class ReplyDecoder:
    """The worker's end: the parameters it holds from the server's replies (``held``), updated by
    each encoded reply. ``Update.params`` are these tensors (fp32, CPU), valid until the next reply.

    Args:
        codec: the worker's own codec, equal to the server's (checked at HELLO).
        shapes: the parameters' shapes.
    """

    def __init__(self, codec: Any, shapes: Sequence[Sequence[int]]) -> None:
        self.codec = codec
        self.held: list[Tensor] | None = None
        self.decoded = _fp32_like(shapes)
        self.storage = _fp32_like(shapes)

    def forget(self) -> None:
        """The connection is gone: what the server knew of this worker's copy is gone with it."""
        self.held = None

    @torch.no_grad()
    def take_full(self, received: Sequence[Tensor]) -> list[Tensor]:
        """A full reply: hold its parameters (converted to fp32) and return them."""
        torch._foreach_copy_(self.storage, list(received))
        self.held = self.storage
        return self.held

    @torch.no_grad()
    def apply(self, payload: Tensor) -> list[Tensor]:
        """An encoded change: ``held + decode(payload)``, returned. ``MalformedReply`` (nothing
        changed) when there is nothing to add it to or the codec refuses the message."""
        if self.held is None:
            raise MalformedReply("an encoded reply before any full reply: there is nothing to add it to")
        try:
            self.codec.decode(payload, self.decoded)  # checked first: a refused message writes nothing
        except ValueError as e:
            raise MalformedReply(f"the server's encoded reply was refused: {e}") from e
        torch._foreach_add_(self.held, self.decoded)
        return self.held
