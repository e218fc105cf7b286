"""Which end of distributed mode each rank gets: ``setup_transport`` builds the server (on the
server rank) or a connected ``DistributedTransport`` (every other rank), and ``local_transport`` the
server rank's own worker's in-process end.

A module of its own so that the client stays one job (a remote worker's end) and a worker rank still
never imports the server: it is loaded here, on the server rank only.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributed import PrefixStore, Store

from heloco.codecs import make_codec
from heloco.distributed.client import DistributedTransport
from heloco.transport import DeltaDownlink, InProcessTransport

if TYPE_CHECKING:
    from heloco.distributed.server import DistributedServer

__all__ = ["local_transport", "setup_transport"]


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
    worker_id: int | None = None,
    num_workers: int | None = None,
    server_worker: int | None = None,
    serve_only: bool = False,
    codec: Any = None,
    downlink_codec: Any = None,
) -> tuple[InProcessTransport | DeltaDownlink | DistributedTransport | None, DistributedServer | None]:
    """Build this rank's transport once ``torch.distributed`` is initialised (any backend).

    On ``server_rank`` the aggregator (or a zero-argument callable building it, so other ranks never
    build one) is wrapped in a started ``DistributedServer`` and the local worker gets
    ``InProcessTransport(server)``; every other rank gets a connected ``DistributedTransport``. The
    traffic always uses gloo pair groups over CPU buffers, even when the default backend is NCCL.
    Returns ``(transport, server)``, ``server`` being ``None`` off the server rank. ``shrink_quorum``
    is the server's (ignored off the server rank).

    By default worker id = rank and there are ``world_size`` workers. When a worker is a group of
    processes, only each group's first rank calls this, with its ``worker_id`` and the
    ``num_workers``, and everyone names the server rank's own worker (``server_worker``). With
    ``serve_only`` (on every rank) the server rank runs no worker: it gets ``(None, server)`` and
    all ``num_workers`` workers connect to it.

    ``codec`` (a ``heloco.codecs`` codec, the same on every rank): workers may send encoded Δ
    (``submit_encoded``); the server decodes it, and the server rank's own worker gets an
    ``InProcessTransport`` that decodes it in process, so every worker's Δ goes through the codec.
    ``downlink_codec`` (``downlink: delta``, the same on every rank): replies are the encoded change
    since each worker's copy; the server rank's own worker gets the same in process
    (``DeltaDownlink``), so every worker's parameters come through the codec.

    The store is the TCPStore underneath the default group's store, so a restarted worker can reach
    the same keys with a plain ``TCPStore(MASTER_ADDR, MASTER_PORT, is_master=False)``.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("setup_transport needs torch.distributed.init_process_group() to have run")
    rank, world = dist.get_rank(), dist.get_world_size()
    if isinstance(server_rank, bool) or not isinstance(server_rank, int) or not 0 <= server_rank < world:
        raise ValueError(f"server_rank must be an int in [0, world_size={world}), got {server_rank!r}")
    worker_id = rank if worker_id is None else worker_id
    num_workers = world if num_workers is None else num_workers
    if store is None:
        store = dist.distributed_c10d._get_default_store()
        while isinstance(store, PrefixStore):
            store = store.underlying_store
    server_worker = server_rank if server_worker is None else server_worker  # the server rank's worker
    if serve_only:
        server_worker = None
    if rank == server_rank:
        from heloco.distributed.server import DistributedServer  # only the server rank needs it

        if aggregator_factory is None:
            raise ValueError(
                f"rank {rank} is the server rank: pass the aggregator (or a factory building it)"
            )
        has_api = callable(getattr(aggregator_factory, "submit", None))
        aggregator = aggregator_factory if has_api else aggregator_factory()
        server = DistributedServer(
            aggregator,
            store,
            num_workers,
            params_like,
            server_rank=server_worker,
            wire_dtype=wire_dtype,
            timeout=timeout,
            connect_timeout=connect_timeout,
            rejoin_timeout=rejoin_timeout,
            prefix=prefix,
            shrink_quorum=shrink_quorum,
            codec=codec,
            downlink_codec=downlink_codec,
        ).start()
        if serve_only:
            return None, server
        return local_transport(server, params_like, codec, downlink_codec), server
    transport = DistributedTransport(
        worker_id,
        params_like,
        store,
        server_rank=server_worker,  # None: no worker runs beside the server
        wire_dtype=wire_dtype,
        timeout=timeout,
        connect_timeout=connect_timeout,
        prefix=prefix,
        codec=codec,
        downlink_codec=downlink_codec,
    )
    return transport, None


def local_transport(
    server: DistributedServer, params_like: Sequence[Tensor], codec: Any, downlink_codec: Any
) -> InProcessTransport | DeltaDownlink:
    """The server rank's own worker's transport: in process, through the same codecs as the remote
    workers' (each a copy of its own: a codec serves one thread, this one is the worker's)."""
    if codec is None:
        transport = InProcessTransport(server)
    else:
        transport = InProcessTransport(server, codec=make_codec(**codec.config()), params_like=params_like)
    if downlink_codec is None:
        return transport
    return DeltaDownlink(transport, make_codec(**downlink_codec.config()), params_like)
