"""How workers reach the aggregator, as interfaces: what a worker calls, what answers it, the errors.

A module of its own, and a light one (no gloo, no wire format), so that a worker, the simulator and
``import heloco`` get the interfaces and ``InProcessTransport`` without loading the distributed
machinery (``heloco.distributed.server``/``.client``), which is imported only when used.

Every transport has the aggregator's two calls, ``dispatch(worker_id)`` and
``submit(worker_id, pseudo_grads, base_version)``, both returning an ``Update``, so a worker does not
care where the server lives: in this process (``InProcessTransport``) or on another rank
(``DistributedTransport`` talking to a ``DistributedServer``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from heloco.aggregator import Update

__all__ = [
    "AggregatorLike",
    "BufferedTransport",
    "Decoder",
    "DeltaDownlink",
    "InProcessTransport",
    "QuorumUnreachable",
    "Server",
    "ServerHandle",
    "ServerStopped",
    "Transport",
    "TransportError",
    "encode_change",
]


@runtime_checkable
class Server(Protocol):
    """What answers a worker's requests: an ``AsyncAggregator``, a wrapper around one (the recipes'
    budget gate), or a ``DistributedServer``. ``InProcessTransport`` forwards to one; a
    ``DistributedServer`` serves one to remote workers (an ``AggregatorLike`` gets more out of it).
    Optional, used when present: ``leave(worker_id)`` (called by ``InProcessTransport.leave``).
    """

    def dispatch(self, worker_id: int) -> Update:
        """The current global parameters and their version (``Update.params``, ``Update.version``)."""
        ...

    def submit(self, worker_id: int, pseudo_grads: Sequence[Tensor], base_version: int) -> Update:
        """Take Δ computed from parameters of ``base_version``; return what the worker continues from
        (``params=None`` while a synchronous round is open, unless the server waits for it)."""
        ...


@runtime_checkable
class AggregatorLike(Server, Protocol):
    """What a ``DistributedServer`` uses of the server it wraps beyond ``Server``'s two calls:
    ``AsyncAggregator``, or a wrapper around one (the recipes' budget gate). The server decides once,
    with ``isinstance``, whether it has one; a plain ``Server`` is served without these (no ``out=``,
    no quorum shrinking, ``num_workers`` and ``params_like`` given to the server).
    """

    num_workers: int  # K (the server's default ``num_workers``)
    quorum: int  # submissions per outer step; > 1: synchronous rounds the server waits for

    @property
    def effective_quorum(self) -> int:
        """The quorum of the open round, lowered once workers were removed (for logging)."""
        ...

    def dispatch(self, worker_id: int, *, out: Sequence[Tensor] | None = None) -> Update:
        """As ``Server.dispatch``; ``out``: tensors to write the parameters into (the server passes
        its message buffer, so a reply costs no copy)."""
        ...

    def submit(
        self,
        worker_id: int,
        pseudo_grads: Sequence[Tensor],
        base_version: int,
        *,
        out: Sequence[Tensor] | None = None,
    ) -> Update:
        """As ``Server.submit``, with ``out`` as for ``dispatch``."""
        ...

    def remove_worker(self, worker_id: int) -> Update:
        """Take a worker gone for good out of the quorum; ``Update.released`` names the workers whose
        round that completed."""
        ...


class Transport(Protocol):
    """A worker's end of the connection to the server, wherever the server runs.

    ``DiLoCoWorker`` calls ``dispatch`` (at the start) and ``submit`` (every ``sync_every`` steps);
    the recipes call ``leave`` when the worker is done. Implemented by ``InProcessTransport`` and
    ``DistributedTransport`` (whose ``worker_id`` argument to ``leave`` is optional).
    """

    def dispatch(self, worker_id: int) -> Update:
        """Fetch the current global parameters and their version."""
        ...

    def submit(self, worker_id: int, pseudo_grads: Sequence[Tensor], base_version: int) -> Update:
        """Send Δ computed from parameters of ``base_version``; return the parameters to continue from."""
        ...

    def leave(self, worker_id: int) -> None:
        """Tell the server this worker is done."""
        ...


class BufferedTransport(Transport, Protocol):
    """A transport that sends from its own buffers (``DistributedTransport``) and offers them.

    ``DiLoCoWorker`` looks for ``pseudo_grad_buffers`` (it is optional: any ``Transport`` works) and,
    if the tensors fit (same shapes and device as the parameters, contiguous, floating point), writes
    Δ straight into them and submits them, so sending copies nothing.
    """

    def pseudo_grad_buffers(self) -> list[Tensor]:
        """The send buffer's tensors, in the wire dtype."""
        ...


@runtime_checkable
class Decoder(Protocol):
    """What the server's end needs of a codec (``heloco.codecs``): an encoded Δ back to fp32."""

    def decode(self, message: Any, out: Sequence[Tensor]) -> Any:
        """Write the message's values into ``out`` (fp32 tensors shaped like the parameters)."""
        ...


class ServerHandle(Protocol):
    """What the server rank's own code does with a running ``DistributedServer`` besides serving
    its local worker (``setup_transport`` returns one on the server rank)."""

    @property
    def stopped(self) -> bool:
        """Whether ``stop()`` ran."""
        ...

    def stop(self) -> None:
        """Stop serving; on return no thread is inside the aggregator and none will enter it again."""
        ...

    def join(self, timeout: float | None = None) -> None:
        """Wait until every remote worker has left, died or never connected (or ``stop()`` ran)."""
        ...

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per worker (index = id): connection state and traffic counters."""
        ...


class TransportError(ConnectionError):
    """The connection between a worker and the server is lost, refused or timed out."""


class ServerStopped(TransportError):
    """The server was stopped (``DistributedServer.stop()``); it serves no more rounds."""


class QuorumUnreachable(TransportError):
    """A synchronous round cannot complete: fewer workers remain than the quorum needs."""


class InProcessTransport:
    """Forwards ``dispatch``/``submit`` to an aggregator (or a ``DistributedServer``) in this process.

    Used by the simulator, and by the server rank's own worker in distributed mode (wrapping the
    ``DistributedServer``, whose ``submit`` waits for a synchronous round to complete). When the target
    takes ``out=`` (``AsyncAggregator`` and ``DistributedServer`` do; decided once, from its signature),
    ``writes_into_out`` is true and the answer can be written straight into the worker's θ_start.

    With a ``codec`` (a ``Decoder``), ``submit_encoded`` takes a worker's encoded Δ and hands the
    target its decoded fp32 values, as a server would decode before its outer step; they are decoded
    into one set of fp32 CPU buffers shaped like ``params_like`` (default: the target's
    ``global_params``).
    """

    def __init__(
        self,
        aggregator: Server,
        *,
        codec: Decoder | None = None,
        params_like: Sequence[Tensor] | None = None,
    ) -> None:
        for method in ("dispatch", "submit"):
            if not callable(getattr(aggregator, method, None)):
                raise ValueError(
                    f"aggregator must have a callable {method}(); got {type(aggregator).__name__}"
                )
        self.aggregator = aggregator
        self.writes_into_out = all(
            "out" in inspect.signature(getattr(aggregator, m)).parameters for m in ("dispatch", "submit")
        )
        self.codec = codec
        self._decoded: list[Tensor] | None = None
        if codec is not None:
            if not isinstance(codec, Decoder):
                raise TypeError(f"codec must have a decode(message, out) method, got {type(codec).__name__}")
            like = params_like if params_like is not None else getattr(aggregator, "global_params", None)
            if like is None:
                raise ValueError("a codec needs params_like (the parameters' shapes) for its fp32 buffers")
            # on the CPU, where codecs work (the wire is CPU); the aggregator moves Δ to its device
            self._decoded = [torch.empty(p.shape, dtype=torch.float32) for p in like]

    def dispatch(self, worker_id: int, *, out: Sequence[Tensor] | None = None) -> Update:
        if out is not None and self.writes_into_out:
            return self.aggregator.dispatch(worker_id, out=out)
        return self.aggregator.dispatch(worker_id)

    def submit(
        self,
        worker_id: int,
        pseudo_grads: Sequence[Tensor],
        base_version: int,
        *,
        out: Sequence[Tensor] | None = None,
    ) -> Update:
        if out is not None and self.writes_into_out:
            return self.aggregator.submit(worker_id, pseudo_grads, base_version, out=out)
        return self.aggregator.submit(worker_id, pseudo_grads, base_version)

    def decode(self, message: Any) -> list[Tensor]:
        """An encoded Δ's fp32 values, in this transport's buffers (valid until the next call)."""
        if self.codec is None or self._decoded is None:
            raise ValueError("this transport has no codec; build it with InProcessTransport(..., codec=...)")
        self.codec.decode(message, out=self._decoded)
        return self._decoded

    def submit_encoded(
        self, worker_id: int, message: Any, base_version: int, *, out: Sequence[Tensor] | None = None
    ) -> Update:
        """``submit`` of an encoded Δ: the target steps on its decoded fp32 values."""
        return self.submit(worker_id, self.decode(message), base_version, out=out)

    def leave(self, worker_id: int) -> None:
        """Tell the target this worker is done, if it keeps track of that (a ``DistributedServer``)."""
        leave = getattr(self.aggregator, "leave", None)
        if callable(leave):
            leave(worker_id)


@torch.no_grad()
def encode_change(
    codec: Any,
    params: Sequence[Tensor],
    held: list[Tensor],
    change: list[Tensor],
    decoded: list[Tensor],
    out: Tensor | None = None,
) -> Any:
    """One delta reply, the rule both modes share: m = encode(θ − h) (into ``out`` if given), then
    h ← h + decode(m), exactly what the receiving worker computes from m's bytes. ``params`` (θ) may
    live in ``out``'s bytes: the change is taken before anything is written. ``change`` and
    ``decoded`` are scratch tensors shaped like θ. A ``ValueError`` from the codec (a non-finite
    change) leaves ``held`` as it was."""
    for c, p in zip(change, params, strict=True):
        c.copy_(p)
    torch._foreach_sub_(change, held)
    message = codec.encode(change, out=out)
    codec.decode(message, decoded)
    torch._foreach_add_(held, decoded)
    return message


class DeltaDownlink:
    """A transport whose replies carry the change of the parameters, encoded, instead of the
    parameters (the simulator's ``downlink: delta``, and the server rank's own worker's in
    distributed mode, whose remote workers get the same over the wire: ``heloco.distributed.downlink``).

    The reply to worker w is m = encode(θ − h_w), θ what the server answers (the global parameters
    or w's look-ahead point) and h_w the parameters w holds from its previous reply; w continues
    from h_w + decode(m), which becomes its new h_w. m's ``nbytes`` is what the network charges
    (``reply_nbytes``).

    No drift: the server keeps h_w, per worker, as exactly what the worker computed (decoding is a
    deterministic function of the bytes, so both ends hold the same fp32 values), so the next
    change is taken against what the worker really holds: what a lossy reply dropped is still in
    θ − h_w and goes down with the next reply (the server's copy is the downlink's error feedback),
    and the worker's parameters stay within one message's error of the server's, never a sum of
    them. In this process the worker's side is applied here, on the server's copy, and the result
    is written into the answer the worker loads, bit for bit what it would compute.

    A worker's first answer (``dispatch`` at the start, or after it left) is the full fp32
    parameters: it holds nothing to add a change to. Holds one fp32 CPU copy of the parameters per
    worker.
    """

    def __init__(self, transport: InProcessTransport, codec: Any, params_like: Sequence[Tensor]) -> None:
        for method in ("encode", "decode"):
            if not callable(getattr(codec, method, None)):
                raise TypeError(f"codec must have encode() and decode(), got {type(codec).__name__}")
        self.transport = transport
        self.codec = codec
        self.writes_into_out = transport.writes_into_out
        self.held: dict[int, list[Tensor]] = {}
        self.nbytes: dict[int, int] = {}
        self.full_nbytes = sum(4 * p.numel() for p in params_like)
        self.change = [torch.empty(p.shape, dtype=torch.float32) for p in params_like]
        self.decoded = [torch.empty(p.shape, dtype=torch.float32) for p in params_like]

    def reply_nbytes(self, worker_id: int) -> int:
        """Bytes of the last answer to ``worker_id`` on the wire."""
        return self.nbytes.get(worker_id, self.full_nbytes)

    def dispatch(self, worker_id: int, *, out: Sequence[Tensor] | None = None) -> Update:
        return self.downlink(worker_id, self.transport.dispatch(worker_id, out=out))

    def submit(
        self,
        worker_id: int,
        pseudo_grads: Sequence[Tensor],
        base_version: int,
        *,
        out: Sequence[Tensor] | None = None,
    ) -> Update:
        return self.downlink(worker_id, self.transport.submit(worker_id, pseudo_grads, base_version, out=out))

    def submit_encoded(
        self, worker_id: int, message: Any, base_version: int, *, out: Sequence[Tensor] | None = None
    ) -> Update:
        return self.downlink(
            worker_id, self.transport.submit_encoded(worker_id, message, base_version, out=out)
        )

    def decode(self, message: Any) -> list[Tensor]:
        return self.transport.decode(message)

    def leave(self, worker_id: int) -> None:
        self.held.pop(worker_id, None)
        self.transport.leave(worker_id)

    @torch.no_grad()
    def downlink(self, worker_id: int, update: Update) -> Update:
        """Turn the answer's parameters (a copy the aggregator made for this worker) into what the
        worker holds after applying the encoded change, and record the reply's size."""
        if update.params is None:
            return update
        held = self.held.get(worker_id)
        if held is None:  # the full parameters
            self.held[worker_id] = [p.detach().to("cpu", torch.float32, copy=True) for p in update.params]
            self.nbytes[worker_id] = self.full_nbytes
            return update
        message = encode_change(self.codec, update.params, held, self.change, self.decoded)
        for p, h in zip(update.params, held, strict=True):
            p.copy_(h)
        self.nbytes[worker_id] = int(message.nbytes)
        return update

    def state_dict(self) -> dict[str, Any]:
        """Every worker's held parameters and last reply size (for a bit-for-bit resume)."""
        return {
            "held": {w: [t.clone() for t in h] for w, h in self.held.items()},
            "nbytes": dict(self.nbytes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held = {
            int(w): [t.to("cpu", torch.float32, copy=True) for t in h] for w, h in state["held"].items()
        }
        self.nbytes = {int(w): int(n) for w, n in state["nbytes"].items()}
