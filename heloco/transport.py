"""How workers reach the aggregator: in the same process, or over torch.distributed (gloo).

Every transport has the aggregator's two calls, ``dispatch(worker_id)`` and
``submit(worker_id, pseudo_grads, base_version)``, both returning an ``Update``, so a worker does not
care where the server lives.

Distributed mode runs one worker per process (rank = worker id). The aggregator lives on one rank
(the *server rank*) inside a ``DistributedServer``; that rank's own worker talks to it in process
(``InProcessTransport(server)``), every other rank through a ``DistributedTransport``.

Why one gloo group *per worker* instead of the job's world group: in a shared group a dead peer goes
unnoticed (an any-source ``recv`` keeps waiting, it does not fail), and the only way to find out is a
timeout, which in gloo closes every connection of the group, i.e. takes every worker down. With a
two-member group per worker (server + that worker, built directly as
``ProcessGroupGloo(PrefixStore("{prefix}/w{i}/{incarnation}", store), rank_in_pair, 2)`` over the job's
store, the way parameter servers on torch.distributed do), a worker process that dies closes only its
own sockets: the server thread serving it gets "connection closed" at once, logs the departure and the
other threads keep serving. A restarted worker takes a new *incarnation* number from the store, which
names a fresh pair group; the server (with ``rejoin_timeout > 0``) connects to it and the worker
resumes from the latest global parameters with ``dispatch``. This only helps under a launcher that
does not tear the whole job down when one rank fails (torchrun's agent does: it stops every local
rank); start ranks independently (plain ``python`` with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, or
srun without kill-on-bad-exit). The job's store lives on the rank that created it (rank 0 with
``env://``), so that rank, usually the server rank, must not die.

Synchronous DiLoCo (aggregator quorum = K) uses the same machinery: a worker whose Δ waits in an open
round is answered when the round completes (the completing call's ``Update.released`` names the
waiting workers, which then get fresh parameters from ``dispatch``). A worker that leaves or is gone
for good (died and did not rejoin, never connected) is taken out of the quorum with the aggregator's
``remove_worker`` (``shrink_quorum=True``, the default): the run goes on with the others, and an open
round that the remaining submissions now complete is closed at once. With ``shrink_quorum=False``,
or an aggregator without ``remove_worker``, the waiting workers get ``QuorumUnreachable`` at once
when too few workers remain.

Wire format: one flat CPU byte buffer per message, preallocated once and reused: a 64-byte binary
header (kind, worker id, version, staleness, weight, flags, payload size, wire dtype), a bounded JSON
region for the statistics or an error text, then the tensors back to back in the wire dtype (the
parameters' own dtype, or e.g. ``torch.bfloat16`` to halve the bytes). Messages without tensors send
only the header. Nothing is copied that need not be: a ``DiLoCoWorker`` writes Δ straight into the
send buffer (``DistributedTransport.pseudo_grad_buffers()``), the server's aggregator reads it from
the receive buffer and writes the reply parameters straight back into it (``out=``), and the worker
loads them from its receive buffer. A connection starts with a HELLO carrying the worker's layout:
gloo aborts the receiving process when a message exceeds its buffer, so layouts are compared before
any tensor travels. Each gloo operation has a timeout; in gloo a timeout closes the connection, so the
operation timeout is the longest a worker may stay silent (one round) and the longest a worker may wait
for its reply (a synchronous round), not a polling interval.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import enum
import hashlib
import json
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.distributed import PrefixStore, ProcessGroupGloo, Store

from heloco.aggregator import Update, _accepts_keyword

__all__ = [
    "WIRE_DTYPES",
    "DistributedServer",
    "DistributedTransport",
    "FlatMessage",
    "InProcessTransport",
    "MessageHeader",
    "MessageKind",
    "QuorumUnreachable",
    "ServerStopped",
    "TransportError",
    "setup_transport",
]

logger = logging.getLogger(__name__)

_TAG = 0  # every message of a pair group travels on one tag, in strict request/reply order
_SERVER = 0  # rank of the server inside a pair group
_WORKER = 1  # rank of the worker inside a pair group
_POLL_S = 0.05  # how often a server thread looks for a (re)connecting worker in the store

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


class TransportError(ConnectionError):
    """The connection between a worker and the server is lost, refused or timed out."""


class ServerStopped(TransportError):
    """The server was stopped (``DistributedServer.stop()``); it serves no more rounds."""


class QuorumUnreachable(TransportError):
    """A synchronous round cannot complete: fewer workers remain than the quorum needs."""


def _as_timedelta(value: float | datetime.timedelta, name: str) -> datetime.timedelta:
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"{name} must be a number of seconds > 0 or a timedelta, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"{name} must be > 0 seconds, got {seconds}")
    return datetime.timedelta(seconds=float(seconds))


def _check_wire_dtype(wire_dtype: torch.dtype | None) -> None:
    if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
        raise ValueError(
            f"wire_dtype must be None (the parameters' own dtype) or one of "
            f"{[str(d) for d in WIRE_DTYPES]}, got {wire_dtype!r}"
        )


def _shapes_and_dtype(params_like: Sequence[Tensor], name: str = "params_like") -> tuple[list, torch.dtype]:
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


# ---------------------------------------------------------------------------------------------------
# In-process
# ---------------------------------------------------------------------------------------------------


class InProcessTransport:
    """Forwards ``dispatch``/``submit`` to an aggregator (or a ``DistributedServer``) in this process.

    Used by the simulator, and by the server rank's own worker in distributed mode (wrapping the
    ``DistributedServer``, whose ``submit`` waits for a synchronous round to complete).
    """

    def __init__(self, aggregator: Any) -> None:
        for method in ("dispatch", "submit"):
            if not callable(getattr(aggregator, method, None)):
                raise ValueError(
                    f"aggregator must have a callable {method}(); got {type(aggregator).__name__}"
                )
        self.aggregator = aggregator

    def dispatch(self, worker_id: int) -> Update:
        return self.aggregator.dispatch(worker_id)

    def submit(self, worker_id: int, pseudo_grads: Sequence[Tensor], base_version: int) -> Update:
        return self.aggregator.submit(worker_id, pseudo_grads, base_version)

    def leave(self, worker_id: int) -> None:
        """Tell the target this worker is done, if it keeps track of that (a ``DistributedServer``)."""
        leave = getattr(self.aggregator, "leave", None)
        if callable(leave):
            leave(worker_id)


# ---------------------------------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------------------------------


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


class FlatMessage:
    """One preallocated, reusable CPU buffer: header, JSON info region, tensors in the wire dtype.

    ``views`` are the tensors inside the buffer, shaped like the global parameters; ``pack`` writes a
    header (and optionally tensors) and returns the slice to send; ``read_header`` parses and checks
    what was received; ``unpack`` copies the tensors out.
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        wire_dtype: torch.dtype = torch.float32,
        info_capacity: int = 4096,
    ) -> None:
        _check_wire_dtype(wire_dtype)
        if isinstance(info_capacity, bool) or not isinstance(info_capacity, int) or info_capacity < 64:
            raise ValueError(f"info_capacity must be an int >= 64 bytes, got {info_capacity!r}")
        self.shapes = [torch.Size(s) for s in shapes]
        self.wire_dtype = wire_dtype
        self.info_capacity = info_capacity
        numels = [s.numel() for s in self.shapes]
        itemsize = torch.empty((), dtype=wire_dtype).element_size()
        self.payload_offset = -(-(_FIXED_BYTES + info_capacity) // _ALIGN) * _ALIGN
        self.payload_nbytes = sum(numels) * itemsize
        self.nbytes = self.payload_offset + self.payload_nbytes
        # torch's allocator aligns to 64 bytes (a bytearray's 16-byte alignment makes every copy into
        # the payload ~20% slower); struct writes the header through a ctypes window on that memory.
        self.buffer = torch.zeros(self.nbytes, dtype=torch.uint8)
        self._mv = memoryview((ctypes.c_ubyte * self.nbytes).from_address(self.buffer.data_ptr())).cast("B")
        payload = self.buffer[self.payload_offset :].view(wire_dtype)
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
        info = json.dumps(header.info, separators=(",", ":")).encode() if header.info else b""
        if len(info) > self.info_capacity:
            raise ValueError(
                f"message info is {len(info)} bytes, more than info_capacity={self.info_capacity}"
            )
        if tensors is not None and not self.holds(tensors):
            if len(tensors) != len(self.views):
                raise ValueError(f"got {len(tensors)} tensors, the message layout has {len(self.views)}")
            for i, (t, v) in enumerate(zip(tensors, self.views, strict=True)):
                if t.shape != v.shape:
                    raise ValueError(f"tensor {i} has shape {tuple(t.shape)}, expected {tuple(v.shape)}")
            torch._foreach_copy_(self.views, [t.detach() for t in tensors])
        flags = (
            (_F_PAYLOAD if payload else 0)
            | (_F_APPLIED if header.applied else 0)
            | (_F_DROPPED if header.dropped else 0)
        )
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
            self.payload_nbytes if payload else 0,
            len(info),
        )
        self._mv[_FIXED_BYTES : _FIXED_BYTES + len(info)] = info
        end = self.nbytes if payload else _FIXED_BYTES + len(info)
        return self.buffer[:end]

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
        if has_payload:
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
        )

    def unpack(self, dtype: torch.dtype) -> list[Tensor]:
        """Fresh tensors of ``dtype`` holding the payload (they outlive the next message)."""
        out = [torch.empty(s, dtype=dtype) for s in self.shapes]
        torch._foreach_copy_(out, self.views)
        return out

    def layout(self) -> dict[str, Any]:
        """What both ends must agree on before any tensor travels (a larger message than the
        receiving buffer aborts the receiving process inside gloo, so this is checked first)."""
        return {
            "tensors": len(self.shapes),
            "payload_nbytes": self.payload_nbytes,
            "wire_dtype": str(self.wire_dtype),
            "info_capacity": self.info_capacity,
            "shapes_sha1": hashlib.sha1(repr([tuple(s) for s in self.shapes]).encode()).hexdigest(),
        }

    def layout_mismatch(self, peer: dict[str, Any]) -> str | None:
        """``None`` if the peer's ``layout()`` equals ours, else which fields differ."""
        ours = self.layout()
        diffs = [f"{k}: peer {peer.get(k)!r}, here {v!r}" for k, v in ours.items() if peer.get(k) != v]
        return "; ".join(diffs) if diffs else None

    def message_nbytes(self, header: MessageHeader) -> int:
        """Size of a received message with this header (for traffic statistics)."""
        if header.has_payload:
            return self.nbytes
        info = json.dumps(header.info, separators=(",", ":")).encode() if header.info else b""
        return _FIXED_BYTES + len(info)


def _reply_header(worker_id: int, update: Update) -> MessageHeader:
    return MessageHeader(
        kind=MessageKind.REPLY,
        worker_id=worker_id,
        version=update.version,
        staleness=update.staleness,
        weight=update.weight,
        applied=update.applied,
        dropped=update.dropped,
        info={"stats": update.stats} if update.stats else {},
    )


# ---------------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------------


def _incarnation_key(prefix: str, worker_id: int) -> str:
    return f"{prefix}/w{worker_id}/incarnation"


def _pair_store(store: Store, prefix: str, worker_id: int, incarnation: int) -> PrefixStore:
    return PrefixStore(f"{prefix}/w{worker_id}/{incarnation}", store)


@dataclasses.dataclass
class _Slot:
    """The server's view of one worker: connection state and traffic counters."""

    worker_id: int
    state: str = "connecting"  # connecting | alive | rejoining | left | dead | missing | local | stopped
    incarnation: int = 0
    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    last_seen: float | None = None  # time.time() of the latest message
    departures: int = 0  # connections lost (deaths, timeouts)
    error: str | None = None  # why the latest connection ended, if not by LEAVE
    thread: threading.Thread | None = None
    message: FlatMessage | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("left", "dead", "missing", "stopped")

    def as_dict(self) -> dict[str, Any]:
        return {
            "worker": self.worker_id,
            "state": self.state,
            "alive": self.state in ("alive", "local"),
            "incarnation": self.incarnation,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "last_seen": self.last_seen,
            "departures": self.departures,
            "error": self.error,
        }


class _ConnectionLost(Exception):
    """A worker's pair group broke (the process died or closed it); raised inside a serving thread."""


class DistributedServer:
    """The aggregator on the server rank, serving every other rank from one thread per worker.

    Each remote worker ``i`` gets its own two-member gloo group (server rank 0, worker rank 1 inside
    it) named by the worker's incarnation, and a daemon thread that blocks in ``recv`` on it, calls the
    (thread-safe) aggregator and answers. The server rank's own worker uses
    ``InProcessTransport(server)``: ``server.dispatch``/``server.submit`` have the aggregator's
    signature, but ``submit`` blocks while the worker's synchronous round is open (quorum > 1) and
    returns the parameters once it completes, exactly what a remote worker receives.

    Args:
        aggregator: an ``AsyncAggregator`` (anything with ``dispatch``/``submit`` returning ``Update``).
        store: the job's key-value store (``TCPStore``) every worker can reach.
        num_workers: K; workers are ranks ``0 .. K-1``. Default: ``aggregator.num_workers``.
        params_like: tensors shaped like the global parameters. Default: ``aggregator.global_params``.
        server_rank: the rank (= worker id) running this server; it gets no thread.
        wire_dtype: dtype of the tensors on the wire; ``None``: the parameters' dtype.
        timeout: seconds (or timedelta) any single receive, send or quorum wait may take. A worker
            silent for longer (one round plus its wait) is treated as dead: in gloo a timeout closes
            the connection. Default 30 min, like torch.distributed.
        connect_timeout: seconds a worker has to connect at start-up (and to finish a reconnection).
        rejoin_timeout: seconds to wait for a restarted incarnation of a worker whose connection was
            lost; 0 (default) never waits (launchers such as torchrun restart the whole job anyway).
        prefix: namespace of the store keys (several servers may share a store).
        info_capacity: bytes reserved in each message for the statistics as JSON.
        shrink_quorum: when a worker leaves or is gone for good and the aggregator runs synchronous
            rounds (``quorum > 1``), call its ``remove_worker`` so the others go on with a smaller
            quorum (waiting workers are released if their round now completes). ``False``: keep the
            quorum, and waiting workers get ``QuorumUnreachable`` once too few remain.

    Replies are written straight into each worker's message buffer when the aggregator's
    ``dispatch``/``submit`` accept ``out=`` (``AsyncAggregator`` does), so no parameter copy is
    allocated per round.

    Lifecycle: ``start()`` launches the threads; ``join()`` waits until every remote worker left,
    died (and did not rejoin) or never connected; ``stop()`` ends serving: when it returns no thread
    is inside the aggregator and none will enter it again, so the caller can take a final checkpoint
    (e.g. after ``KeyboardInterrupt``). Used as a context manager, a normal exit joins and an
    exception stops. A thread blocked in ``recv`` cannot be interrupted (gloo offers no way); it
    answers ``STOPPED`` to its worker's next message, and it is a daemon, so it never keeps the
    process alive.
    """

    def __init__(
        self,
        aggregator: Any,
        store: Store,
        num_workers: int | None = None,
        params_like: Sequence[Tensor] | None = None,
        *,
        server_rank: int = 0,
        wire_dtype: torch.dtype | None = None,
        timeout: float | datetime.timedelta = 1800.0,
        connect_timeout: float | datetime.timedelta = 300.0,
        rejoin_timeout: float = 0.0,
        prefix: str = "heloco",
        info_capacity: int = 4096,
        shrink_quorum: bool = True,
    ) -> None:
        for method in ("dispatch", "submit"):
            if not callable(getattr(aggregator, method, None)):
                raise ValueError(
                    f"aggregator must have a callable {method}(); got {type(aggregator).__name__}"
                )
        if not isinstance(shrink_quorum, bool):
            raise ValueError(f"shrink_quorum must be True or False, got {shrink_quorum!r}")
        if not isinstance(store, Store):
            raise ValueError(
                f"store must be a torch.distributed Store (e.g. TCPStore), got {type(store).__name__}"
            )
        if num_workers is None:
            num_workers = getattr(aggregator, "num_workers", None)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(
                f"num_workers must be an int >= 1 (or taken from the aggregator), got {num_workers!r}"
            )
        agg_workers = getattr(aggregator, "num_workers", num_workers)
        if agg_workers != num_workers:
            raise ValueError(
                f"num_workers={num_workers} but the aggregator was built for {agg_workers} workers"
            )
        if (
            isinstance(server_rank, bool)
            or not isinstance(server_rank, int)
            or not 0 <= server_rank < num_workers
        ):
            raise ValueError(
                f"server_rank must be an int in [0, num_workers={num_workers}), got {server_rank!r}"
            )
        if params_like is None:
            params_like = getattr(aggregator, "global_params", None)
            if params_like is None:
                raise ValueError("params_like is required when the aggregator has no global_params")
        shapes, dtype = _shapes_and_dtype(list(params_like))
        _check_wire_dtype(wire_dtype)
        if (
            isinstance(rejoin_timeout, bool)
            or not isinstance(rejoin_timeout, int | float)
            or rejoin_timeout < 0
        ):
            raise ValueError(f"rejoin_timeout must be a number of seconds >= 0, got {rejoin_timeout!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")

        self.aggregator = aggregator
        self.store = store
        self.num_workers = num_workers
        self.server_rank = server_rank
        self.shapes = shapes
        self.dtype = dtype
        self.wire_dtype = wire_dtype or dtype
        self.timeout = _as_timedelta(timeout, "timeout")
        self.connect_timeout = _as_timedelta(connect_timeout, "connect_timeout")
        self.rejoin_timeout = float(rejoin_timeout)
        self.prefix = prefix
        self.info_capacity = info_capacity
        FlatMessage(shapes[:1], self.wire_dtype, info_capacity)  # validate the layout arguments now

        self._cond = threading.Condition()
        self._stopped = False
        self._started = False
        self._active_calls = 0  # threads inside the aggregator right now
        self._releases = [0] * num_workers  # completed quorum rounds a pending worker has not collected
        self._slots = [_Slot(i) for i in range(num_workers)]
        self._slots[server_rank].state = "local"
        self._warned_info = False
        self.shrink_quorum = shrink_quorum
        self._removed: set[int] = set()  # workers the aggregator took out of the quorum
        # Whether the aggregator can write replies into given tensors (out=): then a reply costs one
        # pass into the message buffer instead of a fresh copy plus a second copy when packing.
        self._dispatch_out = _accepts_keyword(aggregator.dispatch, "out")
        self._submit_out = _accepts_keyword(aggregator.submit, "out")

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> DistributedServer:
        """Launch one serving thread per remote worker; returns ``self``."""
        with self._cond:
            if self._started:
                raise RuntimeError("DistributedServer.start() was already called")
            self._started = True
        for slot in self._slots:
            if slot.worker_id == self.server_rank:
                continue
            slot.thread = threading.Thread(
                target=self._serve_slot, args=(slot,), name=f"heloco-server-w{slot.worker_id}", daemon=True
            )
            slot.thread.start()
        logger.info(
            "heloco server on rank %d serving %d remote workers (wire %s)",
            self.server_rank,
            self.num_workers - 1,
            self.wire_dtype,
        )
        return self

    def stop(self) -> None:
        """Stop serving. On return no thread is inside the aggregator and none will enter it again."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            while self._active_calls:
                self._cond.wait()
            for slot in self._slots:
                if not slot.finished and slot.state != "local":
                    slot.state = "stopped"
        logger.info("heloco server stopped")

    def join(self, timeout: float | None = None) -> None:
        """Wait until every remote worker has left, died or never connected (or ``stop()`` ran).

        Raises ``TimeoutError`` if ``timeout`` seconds pass first, or if some worker never connected
        within ``connect_timeout`` (the others were served to the end regardless).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (self._stopped or all(s.finished or s.state == "local" for s in self._slots)):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    waiting = [s.worker_id for s in self._slots if not s.finished and s.state != "local"]
                    raise TimeoutError(f"heloco server: workers {waiting} still connected after {timeout} s")
                self._cond.wait(remaining)
            missing = [s.worker_id for s in self._slots if s.state == "missing"]
        if missing:
            raise TimeoutError(
                f"heloco server: worker(s) {missing} never connected within "
                f"connect_timeout={self.connect_timeout.total_seconds()} s"
            )

    @property
    def stopped(self) -> bool:
        return self._stopped

    def __enter__(self) -> DistributedServer:
        if not self._started:
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.join()
        else:
            self.stop()

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per worker (index = id): state, alive, incarnation, messages and bytes each way, last seen."""
        with self._cond:
            return [s.as_dict() for s in self._slots]

    # -- the aggregator's interface, with synchronous waiting -----------------------------------------
    @contextmanager
    def _aggregator_call(self) -> Iterator[None]:
        with self._cond:
            if self._stopped:
                raise ServerStopped("the heloco server was stopped")
            self._active_calls += 1
        try:
            yield
        finally:
            with self._cond:
                self._active_calls -= 1
                self._cond.notify_all()

    def _count_local(self, worker_id: int) -> None:
        if worker_id == self.server_rank:
            with self._cond:
                slot = self._slots[worker_id]
                slot.messages_in += 1
                slot.messages_out += 1
                slot.last_seen = time.time()

    def _dispatch(self, worker_id: int, out: Sequence[Tensor] | None) -> Update:
        with self._aggregator_call():
            if out is not None and self._dispatch_out:
                return self.aggregator.dispatch(worker_id, out=out)
            return self.aggregator.dispatch(worker_id)

    def dispatch(self, worker_id: int, *, out: Sequence[Tensor] | None = None) -> Update:
        """The aggregator's ``dispatch``; ``ServerStopped`` after ``stop()``.

        ``out``: tensors to write the parameters into, passed on if the aggregator accepts ``out=``
        (otherwise ``Update.params`` are the aggregator's own copies).
        """
        self._count_local(worker_id)
        return self._dispatch(worker_id, out)

    def submit(
        self,
        worker_id: int,
        pseudo_grads: Sequence[Tensor],
        base_version: int,
        *,
        out: Sequence[Tensor] | None = None,
    ) -> Update:
        """The aggregator's ``submit``, but a pending synchronous round is waited for here.

        The returned ``Update`` keeps this submission's staleness, weight, flags and stats and carries
        the parameters (and version) the worker continues from once its round completed. ``out`` as
        for ``dispatch``.
        """
        self._count_local(worker_id)
        with self._aggregator_call():
            if out is not None and self._submit_out:
                update = self.aggregator.submit(worker_id, pseudo_grads, base_version, out=out)
            else:
                update = self.aggregator.submit(worker_id, pseudo_grads, base_version)
        others = [w for w in update.released if w != worker_id]
        if others:
            with self._cond:
                for w in others:
                    self._releases[w] += 1
                self._cond.notify_all()
        if update.params is not None:
            return update
        deadline = time.monotonic() + self.timeout.total_seconds()
        quorum = int(getattr(self.aggregator, "quorum", 1))
        with self._cond:
            while self._releases[worker_id] == 0:
                if self._stopped:
                    raise ServerStopped("the heloco server was stopped while a quorum was pending")
                gone = [s.worker_id for s in self._slots if s.state in ("left", "dead", "missing")]
                # Workers the aggregator removed no longer count towards its quorum.
                kept = [w for w in gone if w not in self._removed]
                if kept and self.num_workers - len(gone) < quorum:
                    raise QuorumUnreachable(
                        f"worker {worker_id}'s synchronous round cannot complete: quorum {quorum}, "
                        f"but workers {gone} left or died"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"worker {worker_id}'s quorum round did not complete within "
                        f"timeout={self.timeout.total_seconds()} s"
                    )
                self._cond.wait(remaining)
            self._releases[worker_id] -= 1
        fresh = self._dispatch(worker_id, out)
        return dataclasses.replace(update, params=fresh.params, version=fresh.version)

    def leave(self, worker_id: int) -> None:
        """Record that the in-process worker finished (remote workers send a LEAVE message)."""
        if worker_id == self.server_rank:
            self._remove_from_quorum(worker_id)
            with self._cond:
                self._slots[worker_id].state = "left"
                self._cond.notify_all()
            logger.info("worker %d (in process) left", worker_id)

    def _remove_from_quorum(self, worker_id: int) -> None:
        """A worker is gone for good: with ``shrink_quorum`` and synchronous rounds, take it out of the
        aggregator's quorum and release the workers whose round that completes. Runs before the
        worker's state says it is gone, so no waiting worker sees it gone but still counted."""
        remove = getattr(self.aggregator, "remove_worker", None)
        if not self.shrink_quorum or not callable(remove) or int(getattr(self.aggregator, "quorum", 1)) <= 1:
            return
        try:
            with self._aggregator_call():
                update = remove(worker_id)
        except ServerStopped:
            return
        except Exception:  # the round stays as it was; waiting workers get QuorumUnreachable
            logger.exception("removing worker %d from the quorum failed", worker_id)
            return
        released = [w for w in (update.released if update is not None else []) if w != worker_id]
        logger.info(
            "worker %d removed from the quorum (now %s)%s",
            worker_id,
            getattr(self.aggregator, "effective_quorum", None),
            f"; its removal completed the round of workers {released}" if released else "",
        )
        with self._cond:
            self._removed.add(worker_id)
            for w in released:
                self._releases[w] += 1
            self._cond.notify_all()

    # -- serving one remote worker --------------------------------------------------------------------
    def _set_state(self, slot: _Slot, state: str, error: str | None = None) -> None:
        if state in ("left", "dead", "missing") and not slot.finished:
            self._remove_from_quorum(slot.worker_id)
        with self._cond:
            if slot.state == "stopped" and state not in ("left", "dead", "missing"):
                return
            slot.state = state
            if error is not None:
                slot.error = error
            self._cond.notify_all()

    def _await_incarnation(self, store: Store, slot: _Slot, wait_s: float) -> int | None:
        """The newest incarnation number the worker registered, once it exceeds the last one served."""
        key = _incarnation_key(self.prefix, slot.worker_id)
        deadline = time.monotonic() + wait_s
        while not self._stopped:
            incarnation = store.add(key, 0)
            if incarnation > slot.incarnation:
                return incarnation
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_S)
        return None

    def _serve_slot(self, slot: _Slot) -> None:
        try:
            self._serve_slot_until_gone(slot)
        except BaseException as e:  # a bug must not leave join() waiting for a thread that is gone
            logger.exception("heloco server thread for worker %d failed", slot.worker_id)
            self._set_state(slot, "dead", f"server thread failed: {e!r}")

    def _serve_slot_until_gone(self, slot: _Slot) -> None:
        i = slot.worker_id
        # One store connection per thread: a pair-group rendezvous blocked in the store must not
        # hold up the other threads' store calls.
        try:
            store = self.store.clone()
        except (RuntimeError, AttributeError):
            store = self.store
        wait_s = self.connect_timeout.total_seconds()
        while not self._stopped:
            incarnation = self._await_incarnation(store, slot, wait_s)
            if incarnation is None:
                if self._stopped:
                    break
                if slot.incarnation == 0:
                    logger.error("worker %d never connected within %.1f s; serving the others", i, wait_s)
                    self._set_state(slot, "missing", f"never connected within {wait_s} s")
                else:
                    logger.warning("worker %d did not rejoin within %.1f s", i, wait_s)
                    self._set_state(slot, "dead")
                return
            slot.incarnation = incarnation
            try:
                pg = ProcessGroupGloo(
                    _pair_store(store, self.prefix, i, incarnation), _SERVER, 2, self.connect_timeout
                )
            except RuntimeError as e:  # the worker died between registering and connecting
                logger.warning("worker %d incarnation %d failed to connect: %s", i, incarnation, e)
                self._set_state(slot, "connecting", f"connect failed: {e}")
                continue
            if slot.message is None:
                slot.message = FlatMessage(self.shapes, self.wire_dtype, self.info_capacity)
            self._set_state(slot, "alive")
            logger.info("worker %d connected (incarnation %d)", i, incarnation)
            try:
                left = self._serve_connection(slot, pg)
            except _ConnectionLost as e:
                with self._cond:
                    slot.departures += 1
                logger.warning("worker %d left: connection lost (%s); serving the others", i, e)
                if self.rejoin_timeout <= 0 or self._stopped:
                    self._set_state(slot, "dead", str(e))
                    return
                self._set_state(slot, "rejoining", str(e))  # not finished: join() keeps waiting
                wait_s = self.rejoin_timeout
                continue
            finally:
                del pg
            if left:
                logger.info("worker %d left", i)
                self._set_state(slot, "left")
            return

    def _serve_connection(self, slot: _Slot, pg: ProcessGroupGloo) -> bool:
        """Answer one connection's requests until LEAVE (True) or stop (False); raise when it breaks."""
        msg = slot.message
        assert msg is not None
        i = slot.worker_id
        greeted = False
        while True:
            try:
                pg.recv([msg.buffer], _WORKER, _TAG).wait(self.timeout)
            except RuntimeError as e:
                raise _ConnectionLost(str(e).splitlines()[0]) from e
            try:
                header = msg.read_header()
                if header.worker_id != i:
                    raise ValueError(f"message from worker {header.worker_id} on worker {i}'s connection")
            except ValueError as e:
                self._send(slot, pg, self._error_header(i, e))
                continue
            with self._cond:
                slot.messages_in += 1
                slot.bytes_in += msg.message_nbytes(header)
                slot.last_seen = time.time()
            if not greeted:
                # Nothing with tensors may flow before both ends agree on the layout.
                problem = (
                    msg.layout_mismatch(header.info)
                    if header.kind == MessageKind.HELLO
                    else f"expected HELLO first, got {header.kind.name}"
                )
                if problem is not None:
                    error = ValueError(f"message layout mismatch with the server: {problem}")
                    self._send(slot, pg, self._error_header(i, error))
                    logger.error("worker %d refused: %s", i, error)
                    raise _ConnectionLost(f"refused: {error}")
                self._send(slot, pg, MessageHeader(MessageKind.ACK, i))
                greeted = True
                continue
            try:
                if header.kind == MessageKind.LEAVE:
                    self._send(slot, pg, MessageHeader(MessageKind.ACK, i))
                    return True
                if header.kind == MessageKind.DISPATCH:
                    update = self.dispatch(i, out=msg.views)
                elif header.kind == MessageKind.SUBMIT and header.has_payload:
                    # The aggregator converts Δ into its own buffers first, then writes the reply
                    # parameters into the same views: neither direction copies here.
                    update = self.submit(i, msg.views, header.version, out=msg.views)
                else:
                    raise ValueError(f"unexpected {header.kind.name} message from worker {i}")
            except ServerStopped:
                self._send(slot, pg, MessageHeader(MessageKind.STOPPED, i))
                return False
            except Exception as e:  # refused or failed: the worker raises it, the server goes on
                if not isinstance(e, ValueError | TimeoutError | QuorumUnreachable):
                    logger.exception("worker %d's %s failed on the server", i, header.kind.name)
                self._send(slot, pg, self._error_header(i, e))
                continue
            if update.params is None:  # only a misbehaving aggregator gets here
                self._send(
                    slot, pg, self._error_header(i, RuntimeError("the server has no parameters to send"))
                )
                continue
            self._send(slot, pg, _reply_header(i, update), update.params)

    def _error_header(self, worker_id: int, error: BaseException) -> MessageHeader:
        text = str(error)[: self.info_capacity // 8]  # JSON may escape a character into 6 bytes
        return MessageHeader(MessageKind.ERROR, worker_id, info={"error": text, "type": type(error).__name__})

    def _send(
        self,
        slot: _Slot,
        pg: ProcessGroupGloo,
        header: MessageHeader,
        tensors: Sequence[Tensor] | None = None,
    ) -> None:
        msg = slot.message
        assert msg is not None
        try:
            data = msg.pack(header, tensors)
        except ValueError:  # statistics too large for the info region: send the rest without them
            if not self._warned_info:
                self._warned_info = True
                logger.warning(
                    "update stats exceed info_capacity=%d bytes; sending without stats", msg.info_capacity
                )
            data = msg.pack(dataclasses.replace(header, info={}), tensors)
        try:
            pg.send([data], _WORKER, _TAG).wait(self.timeout)
        except RuntimeError as e:
            raise _ConnectionLost(str(e).splitlines()[0]) from e
        with self._cond:
            slot.messages_out += 1
            slot.bytes_out += data.numel()


# ---------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------


class DistributedTransport:
    """A remote worker's end: ``dispatch``/``submit`` over its own gloo pair group with the server.

    Creating it registers a new incarnation of ``worker_id`` in the store and connects (blocking up to
    ``connect_timeout``). A worker restarted after a crash simply creates a new one (with a store
    client of the same job, e.g. ``TCPStore(host, port, is_master=False)``) and calls ``dispatch`` to
    resume from the latest global parameters; the server must run with ``rejoin_timeout > 0``.

    Args:
        worker_id: this worker's id (= its rank).
        params_like: tensors shaped like the global parameters (e.g. the model's parameters); their
            dtype is the wire dtype when ``wire_dtype`` is None.
        store: the job's store (the one the server uses).
        server_rank: the server's rank, for messages only (the pair group has its own ranks).
        wire_dtype, timeout, connect_timeout, prefix, info_capacity: as for ``DistributedServer``;
            both ends must use the same ``wire_dtype``, ``prefix`` and ``info_capacity``.

    ``Update.params`` are CPU views into the transport's receive buffer in the wire dtype (no copy:
    on a loopback link a copy costs a third of the transfer): they stay valid until the next call on
    this transport receives its reply. ``DiLoCoWorker`` copies them into the model at once; clone them
    to keep them longer. ``Update.released`` is always empty (a remote worker is answered only once
    its own round completed). Errors: ``ValueError`` when the server refused a
    request (bad Δ, layout mismatch), ``QuorumUnreachable`` when a synchronous round can no longer
    complete, ``RuntimeError`` when the aggregator failed on the server (which keeps serving),
    ``ServerStopped`` after ``server.stop()``, ``TransportError`` when the connection is lost or
    times out. ``leave()`` (or leaving the ``with`` block) ends the
    session cleanly.
    """

    def __init__(
        self,
        worker_id: int,
        params_like: Sequence[Tensor],
        store: Store,
        *,
        server_rank: int = 0,
        wire_dtype: torch.dtype | None = None,
        timeout: float | datetime.timedelta = 1800.0,
        connect_timeout: float | datetime.timedelta = 300.0,
        prefix: str = "heloco",
        info_capacity: int = 4096,
    ) -> None:
        if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < 0:
            raise ValueError(f"worker_id must be an int >= 0, got {worker_id!r}")
        if worker_id == server_rank:
            raise ValueError(
                f"worker {worker_id} is on the server rank; use InProcessTransport(server) there"
            )
        if not isinstance(store, Store):
            raise ValueError(
                f"store must be a torch.distributed Store (e.g. TCPStore), got {type(store).__name__}"
            )
        shapes, self.dtype = _shapes_and_dtype(list(params_like))
        _check_wire_dtype(wire_dtype)
        self.worker_id = worker_id
        self.server_rank = server_rank
        self.wire_dtype = wire_dtype or self.dtype
        self.timeout = _as_timedelta(timeout, "timeout")
        self.connect_timeout = _as_timedelta(connect_timeout, "connect_timeout")
        self.prefix = prefix
        # Separate send and receive buffers, so the parameters of a reply survive the packing of
        # the next pseudo-gradient.
        self.send_message = FlatMessage(shapes, self.wire_dtype, info_capacity)
        self.recv_message = FlatMessage(shapes, self.wire_dtype, info_capacity)
        self.incarnation = store.add(_incarnation_key(prefix, worker_id), 1)
        try:
            self._pg: ProcessGroupGloo | None = ProcessGroupGloo(
                _pair_store(store, prefix, worker_id, self.incarnation), _WORKER, 2, self.connect_timeout
            )
        except RuntimeError as e:
            raise TransportError(
                f"worker {worker_id} could not connect to the heloco server (rank {server_rank}) within "
                f"connect_timeout={self.connect_timeout.total_seconds()} s: {str(e).splitlines()[0]}"
            ) from e
        self.messages = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        hello = MessageHeader(MessageKind.HELLO, worker_id, info=self.send_message.layout())
        try:
            self._exchange(self.send_message.pack(hello), "hello")
        except ValueError:
            self._pg = None
            raise

    def _check_id(self, worker_id: int) -> None:
        if worker_id != self.worker_id:
            raise ValueError(
                f"this transport belongs to worker {self.worker_id}, got worker_id={worker_id!r}"
            )

    def _exchange(self, data: Tensor, what: str) -> MessageHeader:
        if self._pg is None:
            raise TransportError(f"worker {self.worker_id}'s transport is closed")
        try:
            self._pg.send([data], _SERVER, _TAG).wait(self.timeout)
            self._pg.recv([self.recv_message.buffer], _SERVER, _TAG).wait(self.timeout)
        except RuntimeError as e:
            self._pg = None
            raise TransportError(
                f"worker {self.worker_id}: {what} failed, lost the connection to the heloco server "
                f"(rank {self.server_rank}): {str(e).splitlines()[0]}"
            ) from e
        header = self.recv_message.read_header()
        self.messages += 1
        self.bytes_sent += data.numel()
        self.bytes_received += self.recv_message.message_nbytes(header)
        if header.kind == MessageKind.ERROR:
            text = f"heloco server refused worker {self.worker_id}'s {what}: {header.info.get('error')}"
            kinds = {
                "ValueError": ValueError,
                "TimeoutError": TimeoutError,
                "QuorumUnreachable": QuorumUnreachable,
            }
            raise kinds.get(header.info.get("type"), RuntimeError)(text)
        if header.kind == MessageKind.STOPPED:
            self._pg = None
            raise ServerStopped(f"the heloco server was stopped; worker {self.worker_id} must end")
        return header

    def _update(self, header: MessageHeader) -> Update:
        if header.kind != MessageKind.REPLY or not header.has_payload:
            raise TransportError(f"expected a REPLY with parameters, got {header.kind.name}")
        return Update(
            params=list(self.recv_message.views),
            version=header.version,
            staleness=header.staleness,
            applied=header.applied,
            dropped=header.dropped,
            weight=header.weight,
            released=[],
            stats=dict(header.info.get("stats", {})),
        )

    def dispatch(self, worker_id: int) -> Update:
        """Fetch the current global parameters and their version."""
        self._check_id(worker_id)
        data = self.send_message.pack(MessageHeader(MessageKind.DISPATCH, worker_id))
        return self._update(self._exchange(data, "dispatch"))

    def pseudo_grad_buffers(self) -> list[Tensor]:
        """The send buffer's tensors (wire dtype, CPU). A worker that writes Δ straight into them
        (e.g. ``torch.sub(start, now, out=buf)``, which also converts to bf16) and submits them
        saves one copy of the model per round."""
        return list(self.send_message.views)

    def submit(self, worker_id: int, pseudo_grads: Sequence[Tensor], base_version: int) -> Update:
        """Send Δ computed from parameters of ``base_version``; return what to continue from."""
        self._check_id(worker_id)
        if isinstance(base_version, bool) or not isinstance(base_version, int) or base_version < 0:
            raise ValueError(f"base_version must be an int >= 0, got {base_version!r}")
        header = MessageHeader(MessageKind.SUBMIT, worker_id, version=base_version)
        data = self.send_message.pack(header, list(pseudo_grads))  # no copy if written in place
        return self._update(self._exchange(data, "submit"))

    def leave(self, worker_id: int | None = None) -> None:
        """Tell the server this worker is done and close the connection (idempotent)."""
        if worker_id is not None:
            self._check_id(worker_id)
        if self._pg is None:
            return
        data = self.send_message.pack(MessageHeader(MessageKind.LEAVE, self.worker_id))
        header = self._exchange(data, "leave")
        self._pg = None
        if header.kind != MessageKind.ACK:
            raise TransportError(f"expected ACK to LEAVE, got {header.kind.name}")

    @property
    def connected(self) -> bool:
        return self._pg is not None

    def __enter__(self) -> DistributedTransport:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.leave()
        else:
            self._pg = None  # the peer sees the connection close when this process exits


# ---------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------


def setup_transport(
    params_like: Sequence[Tensor],
    aggregator_factory: Callable[[], Any] | Any | None = None,
    *,
    server_rank: int = 0,
    store: Store | None = None,
    wire_dtype: torch.dtype | None = None,
    timeout: float | datetime.timedelta = 1800.0,
    connect_timeout: float | datetime.timedelta = 300.0,
    rejoin_timeout: float = 0.0,
    prefix: str = "heloco",
    shrink_quorum: bool = True,
) -> tuple[InProcessTransport | DistributedTransport, DistributedServer | None]:
    """Build this rank's transport once ``torch.distributed`` is initialised (any backend).

    On ``server_rank`` the aggregator (or a zero-argument callable building it, so other ranks never
    build one) is wrapped in a started ``DistributedServer`` and the local worker gets
    ``InProcessTransport(server)``; every other rank gets a connected ``DistributedTransport``. The
    traffic always uses gloo pair groups over CPU buffers, even when the default backend is NCCL.
    Returns ``(transport, server)``, ``server`` being ``None`` off the server rank. ``shrink_quorum``
    is the server's (ignored off the server rank).

    The store is the TCPStore underneath the default group's store, so a restarted worker can reach
    the same keys with a plain ``TCPStore(MASTER_ADDR, MASTER_PORT, is_master=False)``.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("setup_transport needs torch.distributed.init_process_group() to have run")
    rank, world = dist.get_rank(), dist.get_world_size()
    if isinstance(server_rank, bool) or not isinstance(server_rank, int) or not 0 <= server_rank < world:
        raise ValueError(f"server_rank must be an int in [0, world_size={world}), got {server_rank!r}")
    if store is None:
        store = dist.distributed_c10d._get_default_store()
        while isinstance(store, PrefixStore):
            store = store.underlying_store
    if rank == server_rank:
        if aggregator_factory is None:
            raise ValueError(
                f"rank {rank} is the server rank: pass the aggregator (or a factory building it)"
            )
        has_api = callable(getattr(aggregator_factory, "submit", None))
        aggregator = aggregator_factory if has_api else aggregator_factory()
        server = DistributedServer(
            aggregator,
            store,
            world,
            params_like,
            server_rank=server_rank,
            wire_dtype=wire_dtype,
            timeout=timeout,
            connect_timeout=connect_timeout,
            rejoin_timeout=rejoin_timeout,
            prefix=prefix,
            shrink_quorum=shrink_quorum,
        ).start()
        return InProcessTransport(server), server
    transport = DistributedTransport(
        rank,
        params_like,
        store,
        server_rank=server_rank,
        wire_dtype=wire_dtype,
        timeout=timeout,
        connect_timeout=connect_timeout,
        prefix=prefix,
    )
    return transport, None
