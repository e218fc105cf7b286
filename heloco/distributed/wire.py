"""What both ends of a distributed connection must agree on: the message format and where they meet.

A module of its own because the server (``heloco.distributed.server``/``.session``) and the worker's
end (``heloco.distributed.client``) both build, send and parse these messages; neither owns them.

Wire format: one flat CPU byte buffer per message, preallocated once and reused: a 64-byte binary
header (kind, worker id, version, staleness, weight, flags, payload size, wire dtype), a bounded JSON
region for the statistics or an error text, then the tensors back to back in the wire dtype (the
parameters' own dtype, or e.g. ``torch.bfloat16`` to halve the bytes). Messages without tensors send
only the header. With a codec (``heloco.codecs``), a SUBMIT may instead carry an *encoded* payload
(flag ``encoded``): the codec's message bytes, exactly ``EncodedMessage.nbytes`` of them after the
info region, not padded to the fp32 size; the buffer is sized for the larger of the two. With a
reply codec (``downlink: delta``, ``heloco.distributed.downlink``) a REPLY may carry an encoded
payload the same way: the change of the parameters since the worker's copy. Nothing is
copied that need not be: a ``DiLoCoWorker`` writes Δ straight into the
send buffer (``DistributedTransport.pseudo_grad_buffers()``), the server's aggregator reads it from
the receive buffer and writes the reply parameters straight back into it (``out=``), and the worker
loads them from its receive buffer. A connection starts with a HELLO carrying the worker's layout:
gloo aborts the receiving process when a message exceeds its buffer, so layouts are compared before
any tensor travels.

Where they meet: worker ``i``'s incarnation ``n`` talks to the server in a two-member gloo group built
over the job's store under ``{prefix}/w{i}/{n}`` (``pair_store``), the server as rank
``SERVER_PAIR_RANK``, the worker as ``WORKER_PAIR_RANK``, every message on ``MESSAGE_TAG``; the
worker registers ``n`` by incrementing the store key ``incarnation_key(prefix, i)``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import enum
import hashlib
import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed import PrefixStore, Store

__all__ = [
    "MESSAGE_TAG",
    "SERVER_PAIR_RANK",
    "WIRE_DTYPES",
    "WORKER_PAIR_RANK",
    "FlatMessage",
    "MessageHeader",
    "MessageKind",
    "as_timedelta",
    "check_wire_dtype",
    "incarnation_key",
    "pair_store",
    "shapes_and_dtype",
]

MESSAGE_TAG = 0  # every message of a pair group travels on one tag, in strict request/reply order
SERVER_PAIR_RANK = 0  # rank of the server inside a pair group
WORKER_PAIR_RANK = 1  # rank of the worker inside a pair group

# Wire dtype codes in the header: both ends must agree, so a mismatch is caught, not misread.
WIRE_DTYPES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
    torch.float64: 4,
}
_DTYPE_OF_CODE = {code: dtype for dtype, code in WIRE_DTYPES.items()}

_MAGIC = b"HLC1"
# magic, kind, flags, wire dtype code, pad, worker id, version, staleness, weight, payload bytes, info bytes
_FIXED = struct.Struct("<4sBBBxiqqdQI")
_FIXED_BYTES = 64  # the struct above, padded so the info region starts aligned
_ALIGN = 64  # the tensor payload starts on a 64-byte boundary

_F_PAYLOAD = 1
_F_APPLIED = 2
_F_DROPPED = 4
_F_ENCODED = 8  # the payload is a codec's message (its own header says which codec), not wire-dtype tensors


# Layout fields present only with a codec or delta replies, and what their absence means.
_OPTIONAL_LAYOUT: dict[str, Any] = {
    "codec": None,
    "encoded_capacity": None,
    "downlink": "params",
    "downlink_codec": None,
    "reply_capacity": None,
}
_LAYOUT_HINTS = {
    "downlink": " (downlink is 'params' or 'delta'; the server and every worker must use the same)",
}


class MessageKind(enum.IntEnum):
    """What a message asks or answers."""

    DISPATCH = 1  # worker → server: send me the current parameters
    SUBMIT = 2  # worker → server: here is Δ (payload), computed from ``version``
    LEAVE = 3  # worker → server: I am done, forget me
    REPLY = 4  # server → worker: parameters (payload), version, staleness, flags, stats
    ACK = 5  # server → worker: your LEAVE was processed
    ERROR = 6  # server → worker: your request was refused (info["error"])
    STOPPED = 7  # server → worker: the server was stopped, no more rounds
    HELLO = 8  # worker → server, first message of a connection: my message layout (info)


def incarnation_key(prefix: str, worker_id: int) -> str:
    """The store key a worker increments to register a new incarnation (the server polls it)."""
    return f"{prefix}/w{worker_id}/incarnation"


def pair_store(store: Store, prefix: str, worker_id: int, incarnation: int) -> PrefixStore:
    """The store namespace of one incarnation's pair group (server and worker build it alike)."""
    return PrefixStore(f"{prefix}/w{worker_id}/{incarnation}", store)


def as_timedelta(value: float | datetime.timedelta, name: str) -> datetime.timedelta:
    """A timeout given as seconds or a timedelta, checked (finite, > 0); ``ValueError`` names ``name``."""
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"{name} must be a number of seconds > 0 or a timedelta, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"{name} must be > 0 seconds, got {seconds}")
    return datetime.timedelta(seconds=float(seconds))


def check_wire_dtype(wire_dtype: torch.dtype | None) -> None:
    """``ValueError`` unless ``wire_dtype`` is ``None`` (the parameters' own dtype) or in ``WIRE_DTYPES``."""
    if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
        raise ValueError(
            f"wire_dtype must be None (the parameters' own dtype) or one of "
            f"{[str(d) for d in WIRE_DTYPES]}, got {wire_dtype!r}"
        )


def shapes_and_dtype(params_like: Sequence[Tensor], name: str = "params_like") -> tuple[list, torch.dtype]:
    """Shapes of the global parameters and their common dtype (the layout both ends must share)."""
    if isinstance(params_like, Tensor) or not isinstance(params_like, Sequence) or not params_like:
        raise ValueError(f"{name} must be a non-empty list of tensors shaped like the global parameters")
    for i, p in enumerate(params_like):
        if not isinstance(p, Tensor):
            raise ValueError(f"{name}[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        if not p.is_floating_point():
            raise ValueError(f"{name}[{i}] has dtype {p.dtype}, expected a floating-point dtype")
    dtypes = {p.dtype for p in params_like}
    if len(dtypes) != 1:
        raise ValueError(
            f"{name} mixes dtypes {sorted(str(d) for d in dtypes)}; use one dtype (fp32 masters)"
        )
    return [tuple(p.shape) for p in params_like], next(iter(dtypes))


@dataclasses.dataclass(frozen=True)
class MessageHeader:
    """Everything a message carries besides its tensors."""

    kind: MessageKind
    worker_id: int
    version: int = 0  # base version (SUBMIT) or the version of the parameters (REPLY)
    staleness: int = 0
    weight: float = 1.0
    applied: bool = False
    dropped: bool = False
    has_payload: bool = False
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # stats, or {"error": ..., "type": ...}
    encoded: bool = False  # the payload is a codec's message (``FlatMessage.encoded_payload``)
    encoded_nbytes: int = 0  # its size in bytes (set by ``read_header``)


class FlatMessage:
    """One preallocated, reusable CPU buffer: header, JSON info region, tensors in the wire dtype.

    ``views`` are the tensors inside the buffer, shaped like the global parameters; ``pack`` writes a
    header (and optionally tensors) and returns the slice to send; ``read_header`` parses and checks
    what was received; ``unpack`` copies the tensors out.

    With a ``codec`` (anything with ``max_nbytes(shapes)`` and ``config()``: a ``heloco.codecs``
    codec), the buffer also holds an encoded payload of up to ``codec.max_nbytes(shapes)`` bytes at
    the same offset (``encoded_region``; ``pack_encoded`` sends it), and ``layout()`` names the codec,
    so two ends with different codecs are refused at HELLO, before any payload travels. A
    ``reply_codec`` does the same for REPLY messages (``downlink: delta``): encoded replies of up to
    ``reply_codec.max_nbytes(shapes)`` bytes, and ``layout()`` says ``downlink: delta`` and names it.
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        wire_dtype: torch.dtype = torch.float32,
        info_capacity: int = 4096,
        codec: Any = None,
        reply_codec: Any = None,
    ) -> None:
        check_wire_dtype(wire_dtype)
        if isinstance(info_capacity, bool) or not isinstance(info_capacity, int) or info_capacity < 64:
            raise ValueError(f"info_capacity must be an int >= 64 bytes, got {info_capacity!r}")
        self.shapes = [torch.Size(s) for s in shapes]
        self.wire_dtype = wire_dtype
        self.info_capacity = info_capacity
        numels = [s.numel() for s in self.shapes]
        itemsize = torch.empty((), dtype=wire_dtype).element_size()
        self.payload_offset = -(-(_FIXED_BYTES + info_capacity) // _ALIGN) * _ALIGN
        self.payload_nbytes = sum(numels) * itemsize
        self.codec_config: dict[str, Any] | None = None
        self.encoded_capacity = 0  # the largest encoded payload this buffer takes (0: none)
        if codec is not None:
            self.codec_config = dict(codec.config())
            self.encoded_capacity = int(codec.max_nbytes([tuple(s) for s in self.shapes]))
        self.reply_codec_config: dict[str, Any] | None = None
        self.reply_capacity = 0  # the largest encoded REPLY this buffer takes (0: replies are params)
        if reply_codec is not None:
            self.reply_codec_config = dict(reply_codec.config())
            self.reply_capacity = int(reply_codec.max_nbytes([tuple(s) for s in self.shapes]))
        self.nbytes = self.payload_offset + self.payload_nbytes
        largest = max(self.payload_nbytes, self.encoded_capacity, self.reply_capacity)
        capacity = self.payload_offset + largest
        # torch's allocator aligns to 64 bytes (a bytearray's 16-byte alignment makes every copy into
        # the payload ~20% slower); struct writes the header through a ctypes window on that memory.
        self.buffer = torch.zeros(capacity, dtype=torch.uint8)
        self._mv = memoryview((ctypes.c_ubyte * capacity).from_address(self.buffer.data_ptr())).cast("B")
        payload = self.buffer[self.payload_offset : self.nbytes].view(wire_dtype)
        self.views = [v.view(s) for v, s in zip(payload.split(numels), self.shapes, strict=True)]

    def holds(self, tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` are exactly this buffer's payload views (then packing copies nothing)."""
        return len(tensors) == len(self.views) and all(
            t.data_ptr() == v.data_ptr() and t.dtype == v.dtype and t.shape == v.shape and t.is_contiguous()
            for t, v in zip(tensors, self.views, strict=True)
        )

    def pack(
        self, header: MessageHeader, tensors: Sequence[Tensor] | None = None, *, payload: bool | None = None
    ) -> Tensor:
        """Write ``header`` (and ``tensors``, converted to the wire dtype); return the bytes to send.

        Tensors that are this buffer's own ``views`` are not copied; ``payload=True`` without tensors
        also sends the payload as it stands.
        """
        if payload is None:
            payload = tensors is not None
        elif tensors is not None and not payload:
            raise ValueError("pack got tensors with payload=False; pass payload=True or no tensors")
        info = self._info_bytes(header)
        if tensors is not None and not self.holds(tensors):
            if len(tensors) != len(self.views):
                raise ValueError(f"got {len(tensors)} tensors, the message layout has {len(self.views)}")
            for i, (t, v) in enumerate(zip(tensors, self.views, strict=True)):
                if t.shape != v.shape:
                    raise ValueError(f"tensor {i} has shape {tuple(t.shape)}, expected {tuple(v.shape)}")
            torch._foreach_copy_(self.views, [t.detach() for t in tensors])
        self._write_header(header, info, _F_PAYLOAD if payload else 0, self.payload_nbytes if payload else 0)
        end = self.nbytes if payload else _FIXED_BYTES + len(info)
        return self.buffer[:end]

    def _info_bytes(self, header: MessageHeader) -> bytes:
        info = json.dumps(header.info, separators=(",", ":")).encode() if header.info else b""
        if len(info) > self.info_capacity:
            raise ValueError(
                f"message info is {len(info)} bytes, more than info_capacity={self.info_capacity}"
            )
        return info

    def _write_header(self, header: MessageHeader, info: bytes, flags: int, payload_nbytes: int) -> None:
        flags |= (_F_APPLIED if header.applied else 0) | (_F_DROPPED if header.dropped else 0)
        _FIXED.pack_into(
            self._mv,
            0,
            _MAGIC,
            int(header.kind),
            flags,
            WIRE_DTYPES[self.wire_dtype],
            int(header.worker_id),
            int(header.version),
            int(header.staleness),
            float(header.weight),
            payload_nbytes,
            len(info),
        )
        self._mv[_FIXED_BYTES : _FIXED_BYTES + len(info)] = info

    def encoded_capacity_of(self, kind: MessageKind) -> int:
        """The largest encoded payload a message of ``kind`` may carry here (0: none): a REPLY's
        is the reply codec's, any other's the codec's."""
        return self.reply_capacity if kind == MessageKind.REPLY else self.encoded_capacity

    def encoded_region(self, kind: MessageKind = MessageKind.SUBMIT) -> Tensor:
        """The bytes an encoded payload of a ``kind`` message occupies (1-D uint8, 64-byte aligned):
        a codec that encodes straight into it (``codec.encode(Δ, out=region)``) makes
        ``pack_encoded`` copy nothing. It overlaps ``views``."""
        capacity = self.encoded_capacity_of(kind)
        if not capacity:
            what = "reply codec (downlink: delta)" if kind == MessageKind.REPLY else "codec"
            raise ValueError(
                f"this message layout has no {what}, so its {kind.name} carries no encoded payloads"
            )
        return self.buffer[self.payload_offset : self.payload_offset + capacity]

    def pack_encoded(self, header: MessageHeader, payload: Tensor) -> Tensor:
        """Write ``header`` and an encoded ``payload`` (1-D uint8: ``EncodedMessage.payload``);
        return the bytes to send: header, info region and exactly ``payload.numel()`` payload bytes.
        A payload already in ``encoded_region()`` is not copied."""
        if not isinstance(payload, Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError("an encoded payload must be a 1-D torch.uint8 tensor (EncodedMessage.payload)")
        n = payload.numel()
        capacity = self.encoded_capacity_of(header.kind)
        if not 0 < n <= capacity:
            codec = self.reply_codec_config if header.kind == MessageKind.REPLY else self.codec_config
            raise ValueError(
                f"encoded payload of {n} bytes does not fit this layout's {header.kind.name} (1 .. "
                f"{capacity} bytes for codec {codec})"
            )
        info = self._info_bytes(header)
        region = self.encoded_region(header.kind)
        if payload.data_ptr() != region.data_ptr():
            region[:n].copy_(payload)
        self._write_header(header, info, _F_PAYLOAD | _F_ENCODED, n)
        return self.buffer[: self.payload_offset + n]

    def encoded_payload(self, header: MessageHeader) -> Tensor:
        """The received encoded payload (a view into the buffer, valid until the next message)."""
        if not header.encoded:
            raise ValueError(f"{header.kind.name} message carries no encoded payload")
        return self.buffer[self.payload_offset : self.payload_offset + header.encoded_nbytes]

    def read_header(self) -> MessageHeader:
        """Parse the header in the buffer; ``ValueError`` if it is not a message of this layout."""
        magic, kind, flags, code, worker_id, version, staleness, weight, payload, info_len = (
            _FIXED.unpack_from(self._mv, 0)
        )
        if magic != _MAGIC:
            raise ValueError(f"not a heloco message (magic {magic!r}, expected {_MAGIC!r})")
        try:
            kind = MessageKind(kind)
        except ValueError:
            raise ValueError(f"unknown message kind {kind}; known: {[k.name for k in MessageKind]}") from None
        has_payload = bool(flags & _F_PAYLOAD)
        encoded = has_payload and bool(flags & _F_ENCODED)
        if encoded:
            capacity = self.encoded_capacity_of(kind)
            if not 0 < payload <= capacity:
                what = (
                    f"takes no encoded {kind.name} payloads (no codec for them)"
                    if not capacity
                    else (f"takes encoded {kind.name} payloads of 1 .. {capacity} bytes")
                )
                raise ValueError(f"encoded payload of {payload} bytes refused: this layout {what}")
        elif has_payload:
            if code != WIRE_DTYPES[self.wire_dtype]:
                peer = _DTYPE_OF_CODE.get(code, f"code {code}")
                raise ValueError(
                    f"wire dtype mismatch: the peer sends {peer}, this side expects {self.wire_dtype}"
                )
            if payload != self.payload_nbytes:
                raise ValueError(
                    f"payload size mismatch: the peer sent {payload} bytes, this layout holds "
                    f"{self.payload_nbytes}; do both sides use the same parameter shapes and wire_dtype?"
                )
        if info_len > self.info_capacity:
            raise ValueError(f"info region of {info_len} bytes exceeds info_capacity={self.info_capacity}")
        info = json.loads(bytes(self._mv[_FIXED_BYTES : _FIXED_BYTES + info_len])) if info_len else {}
        return MessageHeader(
            kind=kind,
            worker_id=worker_id,
            version=version,
            staleness=staleness,
            weight=weight,
            applied=bool(flags & _F_APPLIED),
            dropped=bool(flags & _F_DROPPED),
            has_payload=has_payload,
            info=info,
            encoded=encoded,
            encoded_nbytes=payload if encoded else 0,
        )

    def unpack(self, dtype: torch.dtype) -> list[Tensor]:
        """Fresh tensors of ``dtype`` holding the payload (they outlive the next message)."""
        out = [torch.empty(s, dtype=dtype) for s in self.shapes]
        torch._foreach_copy_(out, self.views)
        return out

    def layout(self) -> dict[str, Any]:
        """What both ends must agree on before any tensor travels (a larger message than the
        receiving buffer aborts the receiving process inside gloo, so this is checked first)."""
        layout = {
            "tensors": len(self.shapes),
            "payload_nbytes": self.payload_nbytes,
            "wire_dtype": str(self.wire_dtype),
            "info_capacity": self.info_capacity,
            "shapes_sha1": hashlib.sha1(repr([tuple(s) for s in self.shapes]).encode()).hexdigest(),
        }
        if self.codec_config is not None:  # absent without a codec: the layout is what it always was
            layout["codec"] = self.codec_config
            layout["encoded_capacity"] = self.encoded_capacity
        if self.reply_codec_config is not None:  # absent with replies of parameters, as before
            layout["downlink"] = "delta"
            layout["downlink_codec"] = self.reply_codec_config
            layout["reply_capacity"] = self.reply_capacity
        return layout

    def layout_mismatch(self, peer: dict[str, Any]) -> str | None:
        """``None`` if the peer's ``layout()`` equals ours, else which fields differ."""
        ours = self.layout()
        keys = [*ours, *(k for k in _OPTIONAL_LAYOUT if k in peer and k not in ours)]

        def value(layout: dict[str, Any], key: str) -> Any:  # an absent field means its default
            return layout.get(key, _OPTIONAL_LAYOUT.get(key))

        diffs = [
            f"{k}: peer {value(peer, k)!r}, here {value(ours, k)!r}{_LAYOUT_HINTS.get(k, '')}"
            for k in keys
            if peer.get(k) != ours.get(k)
        ]
        return "; ".join(diffs) if diffs else None

    def message_nbytes(self, header: MessageHeader) -> int:
        """Size of a received message with this header (for traffic statistics)."""
        if header.encoded:
            return self.payload_offset + header.encoded_nbytes
        if header.has_payload:
            return self.nbytes
        info = json.dumps(header.info, separators=(",", ":")).encode() if header.info else b""
        return _FIXED_BYTES + len(info)
