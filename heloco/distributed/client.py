"""A remote worker's end of distributed mode (``DistributedTransport``).

A module of its own, imported only where a process joins a distributed run: a worker rank needs this
end and the wire format, not the server (``heloco.distributed.setup`` picks the end each rank gets
and imports ``heloco.distributed.server`` on the server rank only).

Each gloo operation has a timeout; in gloo a timeout closes the connection, so the operation timeout
is the longest a worker may stay silent (one round) and the longest a worker may wait for its reply
(a synchronous round), not a polling interval.

A worker that was silent for longer than that (stopped, swapped out) has been declared gone by the
server, whose receive timed out. It must not send on that connection: gloo keeps the server's end of
a connection with a timed-out operation open without reading it (torch offers no way to close it),
so a send there blocked for a whole timeout and the reply's wait for another. The transport counts
the silence itself and refuses at once with ``TransportError`` (``leave`` just closes).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from torch import Tensor
from torch.distributed import ProcessGroupGloo, Store

from heloco.aggregator import Update
from heloco.codecs import make_codec
from heloco.distributed.downlink import MalformedReply, ReplyDecoder
from heloco.distributed.wire import (
    MESSAGE_TAG,
    SERVER_PAIR_RANK,
    WORKER_PAIR_RANK,
    FlatMessage,
    MessageHeader,
    MessageKind,
    as_timedelta,
    check_wire_dtype,
    incarnation_key,
    pair_store,
    shapes_and_dtype,
)
from heloco.transport import (
    QuorumUnreachable,
    ServerStopped,
    TransportError,
)

__all__ = ["DistributedTransport"]


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
        codec: a ``heloco.codecs`` codec (the server's must have the same ``config()``, checked at
            HELLO): ``submit_encoded`` sends its messages, exactly their ``nbytes`` on the wire.
            ``encoded_buffer()`` offers the send buffer's region to encode into (no copy), and
            ``pseudo_grad_buffers()`` offers nothing (Δ must not live where it is encoded to).
            The encoder (the codec, or an ``ErrorFeedback`` around it) lives on the worker.
        downlink_codec: ``downlink: delta`` (the server's must have the same ``config()``, checked
            at HELLO): a reply may carry the change of the parameters since the worker's copy,
            encoded with it, which the transport adds to that copy (``heloco.distributed.downlink``);
            the first reply of a connection is full. ``Update.params`` are then that copy (fp32
            CPU tensors, valid until the next reply). A reply it cannot apply (malformed,
            oversized, non-finite) changes nothing and closes the connection (``MalformedReply``,
            a ``TransportError``): the two ends' copies no longer agree, a new connection starts
            again from a full reply. ``reply_nbytes()`` is the last reply's payload on the wire.

    ``Update.params`` are CPU views into the transport's receive buffer in the wire dtype (no copy:
    on a loopback link a copy costs a third of the transfer): they stay valid until the next call on
    this transport receives its reply. ``DiLoCoWorker`` copies them into the model at once; clone them
    to keep them longer. ``Update.released`` is always empty (a remote worker is answered only once
    its own round completed). Errors: ``ValueError`` when the server refused a
    request (bad Δ, layout mismatch), ``QuorumUnreachable`` when a synchronous round can no longer
    complete, ``RuntimeError`` when the aggregator failed on the server (which keeps serving),
    ``ServerStopped`` after ``server.stop()``, ``TransportError`` when the connection is lost or
    times out. ``leave()`` (or leaving the ``with`` block) ends the
    session cleanly; leaving it by an exception drops the connection without a LEAVE (the server
    sees what a crash looks like).
    """

    def __init__(
        self,
        worker_id: int,
        params_like: Sequence[Tensor],
        store: Store,
        *,
        server_rank: int | None = 0,
        wire_dtype: torch.dtype | None = None,
        timeout: float | datetime.timedelta = 1800.0,
        connect_timeout: float | datetime.timedelta = 300.0,
        prefix: str = "heloco",
        info_capacity: int = 4096,
        codec: Any = None,
        downlink_codec: Any = None,
    ) -> None:
        if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < 0:
            raise ValueError(f"worker_id must be an int >= 0, got {worker_id!r}")
        if server_rank is not None and worker_id == server_rank:
            raise ValueError(
                f"worker {worker_id} is on the server rank; use InProcessTransport(server) there"
            )
        if not isinstance(store, Store):
            raise ValueError(
                f"store must be a torch.distributed Store (e.g. TCPStore), got {type(store).__name__}"
            )
        shapes, self.dtype = shapes_and_dtype(list(params_like))
        check_wire_dtype(wire_dtype)
        self.worker_id = worker_id
        self.server_rank = server_rank
        self.wire_dtype = wire_dtype or self.dtype
        self.timeout = as_timedelta(timeout, "timeout")
        self.connect_timeout = as_timedelta(connect_timeout, "connect_timeout")
        self.prefix = prefix
        # Separate send and receive buffers, so the parameters of a reply survive the packing of
        # the next pseudo-gradient.
        self.codec = codec
        self.send_message = FlatMessage(
            shapes, self.wire_dtype, info_capacity, codec=codec, reply_codec=downlink_codec
        )
        self.recv_message = FlatMessage(shapes, self.wire_dtype, info_capacity, reply_codec=downlink_codec)
        self.replies: ReplyDecoder | None = None  # downlink: delta, what this worker holds
        if downlink_codec is not None:
            self.replies = ReplyDecoder(make_codec(**downlink_codec.config()), shapes)
        self.last_reply_nbytes = 0
        self.incarnation = store.add(incarnation_key(prefix, worker_id), 1)
        try:
            self._pg: ProcessGroupGloo | None = ProcessGroupGloo(
                pair_store(store, prefix, worker_id, self.incarnation),
                WORKER_PAIR_RANK,
                2,
                self.connect_timeout,
            )
        except RuntimeError as e:
            raise TransportError(
                f"worker {worker_id} could not connect to the heloco server (rank {server_rank}) within "
                f"connect_timeout={self.connect_timeout.total_seconds()} s: {str(e).splitlines()[0]}"
            ) from e
        self.messages = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._last_heard = time.monotonic()  # the server's latest answer (its timeout runs from there)
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

    def silent_for(self) -> float:
        """Seconds since the server's latest answer: what the server's receive timeout counts."""
        return time.monotonic() - self._last_heard

    def given_up(self) -> bool:
        """Whether the server has given this connection up: silent for longer than ``timeout``."""
        return self.silent_for() > self.timeout.total_seconds()

    def _exchange(self, data: Tensor, what: str) -> MessageHeader:
        if self._pg is None:
            raise TransportError(f"worker {self.worker_id}'s transport is closed")
        if what != "hello" and self.given_up():
            self._pg = None
            raise TransportError(
                f"worker {self.worker_id}: {what} failed, not sent: silent for {self.silent_for():.1f} s, "
                f"longer than timeout={self.timeout.total_seconds()} s, so the heloco server "
                f"(rank {self.server_rank}) has declared this worker gone; start it again to rejoin"
            )
        try:
            self._pg.send([data], SERVER_PAIR_RANK, MESSAGE_TAG).wait(self.timeout)
            self._pg.recv([self.recv_message.buffer], SERVER_PAIR_RANK, MESSAGE_TAG).wait(self.timeout)
        except RuntimeError as e:
            self._pg = None
            raise TransportError(
                f"worker {self.worker_id}: {what} failed, lost the connection to the heloco server "
                f"(rank {self.server_rank}): {str(e).splitlines()[0]}"
            ) from e
        self._last_heard = time.monotonic()
        try:
            header = self.recv_message.read_header()
        except ValueError as e:
            if self.replies is None:
                raise
            self._close_on_bad_reply(e)  # the server may have moved its copy of ours on
        self.messages += 1
        self.bytes_sent += data.numel()
        self.bytes_received += self.recv_message.message_nbytes(header)
        if header.kind == MessageKind.ERROR:
            text = f"heloco server refused worker {self.worker_id}'s {what}: {header.info.get('error')}"
            kinds = {
                "ValueError": ValueError,
                "MalformedMessage": ValueError,  # an encoded Δ the server's codec refused
                "TimeoutError": TimeoutError,
                "QuorumUnreachable": QuorumUnreachable,
            }
            raise kinds.get(header.info.get("type"), RuntimeError)(text)
        if header.kind == MessageKind.STOPPED:
            self._pg = None
            raise ServerStopped(f"the heloco server was stopped; worker {self.worker_id} must end")
        return header

    def _close_on_bad_reply(self, error: Exception) -> NoReturn:
        self._pg = None
        if self.replies is not None:
            self.replies.forget()
        raise MalformedReply(
            f"worker {self.worker_id} refused the heloco server's reply and closed the connection (its "
            f"copy of the parameters is unchanged; start the worker again to rejoin): {error}"
        ) from error

    def _reply_params(self, header: MessageHeader) -> list[Tensor]:
        """The parameters a reply leaves this worker with: the receive buffer's views, or with
        ``downlink: delta`` its held copy (set by a full reply, moved on by an encoded change)."""
        if header.encoded:
            replies = self.replies
            assert replies is not None  # read_header refuses encoded replies without a reply codec
            try:
                params = replies.apply(self.recv_message.encoded_payload(header))
            except MalformedReply as e:
                self._close_on_bad_reply(e)
            self.last_reply_nbytes = header.encoded_nbytes
            return params
        self.last_reply_nbytes = self.recv_message.payload_nbytes
        if self.replies is not None:
            return self.replies.take_full(self.recv_message.views)
        return list(self.recv_message.views)

    def reply_nbytes(self, worker_id: int | None = None) -> int:
        """Bytes of the last reply's payload on the wire: the parameters in the wire dtype, or an
        encoded change's ``nbytes`` (``downlink: delta``)."""
        if worker_id is not None:
            self._check_id(worker_id)
        return self.last_reply_nbytes

    def _update(self, header: MessageHeader) -> Update:
        if header.kind != MessageKind.REPLY or not header.has_payload:
            raise TransportError(f"expected a REPLY with parameters, got {header.kind.name}")
        return Update(
            params=self._reply_params(header),
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
        saves one copy of the model per round. None with a codec: the encoded message is written
        into the same bytes, so Δ must be computed elsewhere."""
        return [] if self.codec is not None else list(self.send_message.views)

    def encoded_buffer(self) -> Tensor:
        """Where to encode Δ (``codec.encode(Δ, out=...)``) so that ``submit_encoded`` copies
        nothing: the send buffer's payload region (``ValueError`` without a codec)."""
        return self.send_message.encoded_region()

    def submit_encoded(self, worker_id: int, message: Any, base_version: int) -> Update:
        """``submit`` of an encoded Δ (an ``EncodedMessage``, or its payload tensor): the server
        decodes it to fp32 with its own codec before its outer step, and refuses (``ValueError``,
        nothing changed) a message that does not decode."""
        self._check_id(worker_id)
        if isinstance(base_version, bool) or not isinstance(base_version, int) or base_version < 0:
            raise ValueError(f"base_version must be an int >= 0, got {base_version!r}")
        if self.codec is None:
            raise ValueError(
                "this transport has no codec; build it with DistributedTransport(..., codec=...)"
            )
        payload = getattr(message, "payload", message)
        header = MessageHeader(MessageKind.SUBMIT, worker_id, version=base_version)
        data = self.send_message.pack_encoded(header, payload)  # no copy if encoded in place
        return self._update(self._exchange(data, "submit"))

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
        if self.given_up():  # the server already counts this worker as gone: nothing to tell it
            self._pg = None
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
