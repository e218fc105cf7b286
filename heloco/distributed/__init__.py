"""Workers ↔ server: the transport interfaces, in process or over torch.distributed (gloo).

Split by who needs what, so each process loads only what it uses:

    protocol   Transport / Server / AggregatorLike interfaces, the errors, InProcessTransport (light; ``heloco`` uses it)
    wire       message kinds, header, FlatMessage buffers, wire dtypes, where the two ends meet
    server     DistributedServer: the aggregator on the server rank (one thread per remote worker)
    session    one remote worker's slot and serving thread (used by the server)
    client     DistributedTransport (a remote worker's end) and setup_transport

This package imports none of them eagerly: ``from heloco.distributed import DistributedServer``
loads the module that defines the name on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from heloco.distributed.client import DistributedTransport, setup_transport
    from heloco.distributed.protocol import (
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
    from heloco.distributed.server import DistributedServer
    from heloco.distributed.wire import WIRE_DTYPES, FlatMessage, MessageHeader, MessageKind

_MODULE_OF = {
    "AggregatorLike": "protocol",
    "BufferedTransport": "protocol",
    "InProcessTransport": "protocol",
    "QuorumUnreachable": "protocol",
    "Server": "protocol",
    "ServerHandle": "protocol",
    "ServerStopped": "protocol",
    "Transport": "protocol",
    "TransportError": "protocol",
    "WIRE_DTYPES": "wire",
    "FlatMessage": "wire",
    "MessageHeader": "wire",
    "MessageKind": "wire",
    "DistributedServer": "server",
    "DistributedTransport": "client",
    "setup_transport": "client",
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
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
