"""One remote worker as the server sees it: its slot (state, traffic counters) and its serving thread.

A module of its own so that ``DistributedServer`` (``heloco.distributed.server``) keeps to the
aggregator, the lifecycle and the synchronous waiting, while everything that happens on one worker's
connection is here: waiting for each incarnation to register, connecting its pair group, the HELLO
layout check, answering requests, noticing that the worker left, died or never came, and waiting for
a rejoin. The server runs one ``WorkerSession`` per remote worker, each on its own daemon thread.
With ``downlink: delta`` the session also keeps its worker's copy of the parameters
(``heloco.distributed.downlink.ReplyEncoder``) and encodes each reply against it; every new
connection starts again from a full reply.

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
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.distributed import ProcessGroupGloo, Store

from heloco.aggregator import Update
from heloco.codecs import Codec, make_codec
from heloco.distributed.downlink import ReplyEncoder
from heloco.distributed.wire import (
    MESSAGE_TAG,
    SERVER_PAIR_RANK,
    WORKER_PAIR_RANK,
    FlatMessage,
    MessageHeader,
    MessageKind,
    incarnation_key,
    pair_store,
)
from heloco.transport import QuorumUnreachable, ServerStopped

__all__ = ["SessionHost", "WorkerSession", "WorkerSlot"]

logger = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a server thread looks for a (re)connecting worker in the store


class SessionHost(Protocol):
    """What a session needs of the server it serves for (``DistributedServer``): its answers, whether it
    stopped, and its settings. A protocol, so that this module does not import the server's."""

    prefix: str
    store: Store
    shapes: list[tuple[int, ...]]
    wire_dtype: Any
    info_capacity: int
    timeout: datetime.timedelta
    connect_timeout: datetime.timedelta
    rejoin_timeout: float
    codec: Any  # a heloco.codecs codec, or None: encoded payloads are refused
    downlink_codec: Any  # a heloco.codecs codec: replies are encoded changes (downlink: delta); None: params

    @property
    def stopped(self) -> bool: ...

    def dispatch(self, worker_id: int, *, out: Sequence[Tensor] | None = None) -> Update: ...

    def submit(
        self, worker_id: int, pseudo_grads: Sequence[Tensor], base_version: int, *, out: Any = None
    ) -> Update: ...


@dataclasses.dataclass
class WorkerSlot:
    """The server's view of one worker: connection state and traffic counters.

    Guarded by the server's condition variable; ``DistributedServer.worker_stats()`` reports
    ``as_dict()`` of every slot.
    """

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
    replies: ReplyEncoder | None = None  # downlink: delta: the server's copy of what the worker holds

    @property
    def finished(self) -> bool:
        """Whether the worker is gone for this server (left, dead, missing, or the server stopped)."""
        return self.state in ("left", "dead", "missing", "stopped")

    def as_dict(self) -> dict[str, Any]:
        """The slot as plain values (``DistributedServer.worker_stats()``)."""
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


class WorkerSession:
    """Serves one remote worker for a ``DistributedServer`` until it is gone; ``run`` is the thread.

    Args:
        server: whose ``dispatch``/``submit`` answer the worker's requests, whose ``stopped`` ends
            serving, and whose settings (store, prefix, shapes, wire dtype, info capacity, timeouts)
            this session follows.
        slot: this worker's slot (one of the server's).
        cond: the server's condition variable: it guards every slot and is notified when one
            changes state (``join`` and the synchronous waits listen to it).
        on_gone: called with the worker id before the slot first says left, dead or missing (the
            server takes the worker out of a synchronous quorum there).
        stats_dropped: set when a reply was sent without its statistics (too large for the info
            region); shared by the server's sessions so that this is logged once per server.
    """

    def __init__(
        self,
        server: SessionHost,
        slot: WorkerSlot,
        cond: threading.Condition,
        on_gone: Callable[[int], None],
        stats_dropped: threading.Event,
    ) -> None:
        self.server = server
        self.slot = slot
        self.cond = cond
        self.on_gone = on_gone
        self.stats_dropped = stats_dropped
        self.decoder: Codec | None = None  # this thread's own codec (a codec serves one thread)
        self.decoded: list[Tensor] | None = None  # fp32 buffers an encoded Δ is decoded into
        if server.codec is not None:
            self.decoder = make_codec(**server.codec.config())
            self.decoded = [torch.empty(s, dtype=torch.float32) for s in server.shapes]
        self.replies: ReplyEncoder | None = None  # downlink: delta, what this worker holds
        if server.downlink_codec is not None:
            self.replies = ReplyEncoder(make_codec(**server.downlink_codec.config()), server.shapes)
            slot.replies = self.replies

    def run(self) -> None:
        """Serve every incarnation of the worker until it is gone or the server stopped."""
        try:
            self._serve_until_gone()
        except BaseException as e:  # a bug must not leave join() waiting for a thread that is gone
            logger.exception("heloco server thread for worker %d failed", self.slot.worker_id)
            self._set_state("dead", f"server thread failed: {e!r}")

    def _set_state(self, state: str, error: str | None = None) -> None:
        slot = self.slot
        if state in ("left", "dead", "missing") and not slot.finished:
            self.on_gone(slot.worker_id)
        with self.cond:
            if slot.state == "stopped" and state not in ("left", "dead", "missing"):
                return
            slot.state = state
            if error is not None:
                slot.error = error
            self.cond.notify_all()

    def _await_incarnation(self, store: Store, wait_s: float) -> int | None:
        """The newest incarnation number the worker registered, once it exceeds the last one served."""
        slot = self.slot
        key = incarnation_key(self.server.prefix, slot.worker_id)
        deadline = time.monotonic() + wait_s
        while not self.server.stopped:
            incarnation = store.add(key, 0)
            if incarnation > slot.incarnation:
                return incarnation
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_S)
        return None

    def _serve_until_gone(self) -> None:
        server, slot = self.server, self.slot
        i = slot.worker_id
        # One store connection per thread: a pair-group rendezvous blocked in the store must not
        # hold up the other threads' store calls.
        try:
            store = server.store.clone()
        except (RuntimeError, AttributeError):
            store = server.store
        wait_s = server.connect_timeout.total_seconds()
        while not server.stopped:
            incarnation = self._await_incarnation(store, wait_s)
            if incarnation is None:
                if server.stopped:
                    break
                if slot.incarnation == 0:
                    logger.error("worker %d never connected within %.1f s; serving the others", i, wait_s)
                    self._set_state("missing", f"never connected within {wait_s} s")
                else:
                    logger.warning("worker %d did not rejoin within %.1f s", i, wait_s)
                    self._set_state("dead")
                return
            slot.incarnation = incarnation
            try:
                pg = ProcessGroupGloo(
                    pair_store(store, server.prefix, i, incarnation),
                    SERVER_PAIR_RANK,
                    2,
                    server.connect_timeout,
                )
            except RuntimeError as e:  # the worker died between registering and connecting
                logger.warning("worker %d incarnation %d failed to connect: %s", i, incarnation, e)
                self._set_state("connecting", f"connect failed: {e}")
                continue
            if slot.message is None:
                slot.message = FlatMessage(
                    server.shapes,
                    server.wire_dtype,
                    server.info_capacity,
                    codec=server.codec,
                    reply_codec=server.downlink_codec,
                )
            if self.replies is not None:
                self.replies.forget()  # a new connection holds nothing: its first reply is full
            self._set_state("alive")
            logger.info("worker %d connected (incarnation %d)", i, incarnation)
            try:
                left = self._serve_connection(pg)
            except _ConnectionLost as e:
                with self.cond:
                    slot.departures += 1
                logger.warning("worker %d left: connection lost (%s); serving the others", i, e)
                if server.rejoin_timeout <= 0 or server.stopped:
                    self._set_state("dead", str(e))
                    return
                self._set_state("rejoining", str(e))  # not finished: join() keeps waiting
                wait_s = server.rejoin_timeout
                continue
            finally:
                del pg
            if left:
                logger.info("worker %d left", i)
                self._set_state("left")
            return

    def _serve_connection(self, pg: ProcessGroupGloo) -> bool:
        """Answer one connection's requests until LEAVE (True) or stop (False); raise when it breaks."""
        server, slot = self.server, self.slot
        msg = slot.message
        assert msg is not None
        i = slot.worker_id
        greeted = False
        while True:
            try:
                pg.recv([msg.buffer], WORKER_PAIR_RANK, MESSAGE_TAG).wait(server.timeout)
            except RuntimeError as e:
                raise _ConnectionLost(str(e).splitlines()[0]) from e
            try:
                header = msg.read_header()
                if header.worker_id != i:
                    raise ValueError(f"message from worker {header.worker_id} on worker {i}'s connection")
            except ValueError as e:
                self._send(pg, self._error_header(e))
                continue
            with self.cond:
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
                    self._send(pg, self._error_header(error))
                    logger.error("worker %d refused: %s", i, error)
                    raise _ConnectionLost(f"refused: {error}")
                self._send(pg, MessageHeader(MessageKind.ACK, i))
                greeted = True
                continue
            try:
                if header.kind == MessageKind.LEAVE:
                    self._send(pg, MessageHeader(MessageKind.ACK, i))
                    return True
                if header.kind == MessageKind.DISPATCH:
                    update = server.dispatch(i, out=msg.views)
                elif header.kind == MessageKind.SUBMIT and header.encoded:
                    # Decoded (and checked) before the aggregator sees anything: a message that
                    # does not decode raises MalformedMessage (a ValueError), the model untouched.
                    update = server.submit(
                        i, self._decode(msg.encoded_payload(header)), header.version, out=msg.views
                    )
                elif header.kind == MessageKind.SUBMIT and header.has_payload:
                    # The aggregator converts Δ into its own buffers first, then writes the reply
                    # parameters into the same views: neither direction copies here.
                    update = server.submit(i, msg.views, header.version, out=msg.views)
                else:
                    raise ValueError(f"unexpected {header.kind.name} message from worker {i}")
                if update.params is None:  # only a misbehaving aggregator gets here
                    raise RuntimeError("the server has no parameters to send")
                encoded = self._encode_reply(update.params)
            except ServerStopped:
                self._send(pg, MessageHeader(MessageKind.STOPPED, i))
                return False
            except Exception as e:  # refused or failed: the worker raises it, the server goes on
                if not isinstance(e, ValueError | TimeoutError | QuorumUnreachable):
                    logger.exception("worker %d's %s failed on the server", i, header.kind.name)
                self._send(pg, self._error_header(e))
                continue
            if encoded is not None:
                self._send(pg, _reply_header(i, update), encoded=encoded.payload)
                continue
            params = update.params
            if self.replies is not None:  # a full reply: the worker will hold the views' values
                if not msg.holds(params):
                    torch._foreach_copy_(msg.views, [p.detach() for p in params])
                self.replies.sent_full(msg.views)
                params = msg.views
            self._send(pg, _reply_header(i, update), params)

    def _encode_reply(self, params: Sequence[Tensor]) -> Any:
        """With ``downlink: delta`` and a full reply already sent on this connection, the change
        since the worker's copy, encoded into the message (an ``EncodedMessage``); None: send
        ``params`` in full."""
        replies, msg = self.replies, self.slot.message
        if replies is None or replies.wants_full:
            return None
        assert msg is not None
        return replies.encode(params, out=msg.encoded_region(MessageKind.REPLY))

    def _decode(self, payload: Tensor) -> list[Tensor]:
        """An encoded Δ's fp32 values, in this session's buffers; ``ValueError`` if it is refused."""
        if self.decoder is None or self.decoded is None:
            raise ValueError("this server takes no encoded payloads (it has no codec)")
        self.decoder.decode(payload, out=self.decoded)
        return self.decoded

    def _error_header(self, error: BaseException) -> MessageHeader:
        text = str(error)[: self.server.info_capacity // 8]  # JSON may escape a character into 6 bytes
        return MessageHeader(
            MessageKind.ERROR, self.slot.worker_id, info={"error": text, "type": type(error).__name__}
        )

    def _send(
        self,
        pg: ProcessGroupGloo,
        header: MessageHeader,
        tensors: Sequence[Tensor] | None = None,
        *,
        encoded: Tensor | None = None,
    ) -> None:
        """Send ``header`` with ``tensors`` (the parameters) or an ``encoded`` payload (already in
        the message's encoded region), or neither."""
        slot = self.slot
        msg = slot.message
        assert msg is not None

        def pack(header: MessageHeader) -> Tensor:
            return msg.pack(header, tensors) if encoded is None else msg.pack_encoded(header, encoded)

        try:
            data = pack(header)
        except ValueError:  # statistics too large for the info region: send the rest without them
            if not self.stats_dropped.is_set():
                self.stats_dropped.set()
                logger.warning(
                    "update stats exceed info_capacity=%d bytes; sending without stats", msg.info_capacity
                )
            data = pack(dataclasses.replace(header, info={}))
        try:
            pg.send([data], WORKER_PAIR_RANK, MESSAGE_TAG).wait(self.server.timeout)
        except RuntimeError as e:
            raise _ConnectionLost(str(e).splitlines()[0]) from e
        with self.cond:
            slot.messages_out += 1
            slot.bytes_out += data.numel()
