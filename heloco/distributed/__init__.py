"""Workers ↔ server: the transport interfaces, in process or over torch.distributed (gloo).

Split by who needs what, so each process loads only what it uses:

    (heloco.transport, outside this package: the Transport / Server / AggregatorLike interfaces, the
    errors and InProcessTransport; re-exported here)
    wire       message kinds, header, FlatMessage buffers, wire dtypes, where the two ends meet
    server     DistributedServer: the aggregator on the server rank (one thread per remote worker)
    session    one remote worker's slot and serving thread (used by the server)
    downlink   delta replies (downlink: delta): each end's copy of what a worker holds
    client     DistributedTransport (a remote worker's end)
    setup      setup_transport: the end each rank gets (the server on the server rank)
    overlap    BackgroundExchange: an overlapped worker's exchange on a background thread
    link       EmulatedLink: a transport that sleeps as a slow link would (experiments)

This package imports none of them eagerly: ``from heloco.distributed import DistributedServer``
loads the module that defines the name on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from heloco.distributed.client import DistributedTransport
    from heloco.distributed.server import DistributedServer
    from heloco.distributed.setup import setup_transport
    from heloco.distributed.wire import WIRE_DTYPES, FlatMessage, MessageHeader, MessageKind
    from heloco.transport import (
        AggregatorLike,
        BufferedTransport,
        InProcessTransport,
        QuorumUnreachable,
        Server,
        ServerHandle,
        ServerStopped,
        Transport,
        TransportError,
    )

_MODULE_OF = {
    "AggregatorLike": "heloco.transport",
    "BufferedTransport": "heloco.transport",
    "InProcessTransport": "heloco.transport",
    "QuorumUnreachable": "heloco.transport",
    "Server": "heloco.transport",
    "ServerHandle": "heloco.transport",
    "ServerStopped": "heloco.transport",
    "Transport": "heloco.transport",
    "TransportError": "heloco.transport",
    "WIRE_DTYPES": "heloco.distributed.wire",
    "FlatMessage": "heloco.distributed.wire",
    "MessageHeader": "heloco.distributed.wire",
    "MessageKind": "heloco.distributed.wire",
    "DistributedServer": "heloco.distributed.server",
    "DistributedTransport": "heloco.distributed.client",
    "setup_transport": "heloco.distributed.setup",
}

__all__ = [
    "WIRE_DTYPES",
    "AggregatorLike",
    "BufferedTransport",
    "DistributedServer",
    "DistributedTransport",
    "FlatMessage",
    "InProcessTransport",
    "MessageHeader",
    "MessageKind",
    "QuorumUnreachable",
    "Server",
    "ServerHandle",
    "ServerStopped",
    "Transport",
    "TransportError",
    "setup_transport",
]


def __getattr__(name: str) -> Any:
    """Load the submodule defining ``name`` on first access (PEP 562)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
