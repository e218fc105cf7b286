"""The server rank's side of distributed mode: ``DistributedServer``, the aggregator behind gloo.

A module of its own, imported only on the server rank (``heloco.distributed.setup`` loads it there), because
only that rank runs the aggregator, the serving threads and the synchronous-round bookkeeping. What
happens on one worker's connection lives in ``heloco.distributed.session``.

Distributed mode runs one worker per process (rank = worker id). The aggregator lives on one rank
(the *server rank*) inside a ``DistributedServer``; that rank's own worker talks to it in process
(``InProcessTransport(server)``), every other rank through a ``DistributedTransport``, each over a
two-member gloo group of its own (why: ``heloco.distributed.session``).

Synchronous DiLoCo (aggregator quorum = K) uses the same machinery: a worker whose Δ waits in an open
round is answered when the round completes (the completing call's ``Update.released`` names the
waiting workers, which then get fresh parameters from ``dispatch``). A worker that leaves or is gone
for good (died and did not rejoin, never connected) is taken out of the quorum with the aggregator's
``remove_worker`` (``shrink_quorum=True``, the default): the run goes on with the others, and an open
round that the remaining submissions now complete is closed at once. With ``shrink_quorum=False``,
the waiting workers get ``QuorumUnreachable`` at once when too few workers remain.

What the server uses of what it serves is declared, not probed: a plain ``Server`` (``dispatch`` and
``submit``) is enough; an ``AggregatorLike`` (``heloco.transport``: ``AsyncAggregator``, the
recipes' gate) also gets ``out=``, its ``quorum`` and ``remove_worker``. Which one it is is decided
once, when the server is built.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.distributed import Store

from heloco.aggregator import AsyncAggregator, Update
from heloco.distributed.session import WorkerSession, WorkerSlot
from heloco.distributed.wire import FlatMessage, as_timedelta, check_wire_dtype, shapes_and_dtype
from heloco.transport import AggregatorLike, QuorumUnreachable, Server, ServerStopped

__all__ = ["DistributedServer"]

logger = logging.getLogger(__name__)


class DistributedServer:
    """The aggregator on the server rank, serving every other rank from one thread per worker.

    Each remote worker ``i`` gets its own two-member gloo group (server rank 0, worker rank 1 inside
    it) named by the worker's incarnation, and a daemon thread that blocks in ``recv`` on it, calls the
    (thread-safe) aggregator and answers. The server rank's own worker uses
    ``InProcessTransport(server)``: ``server.dispatch``/``server.submit`` have the aggregator's
    signature, but ``submit`` blocks while the worker's synchronous round is open (quorum > 1) and
    returns the parameters once it completes, exactly what a remote worker receives.

    Args:
        aggregator: an ``AggregatorLike`` (``AsyncAggregator`` or a wrapper around one), or any
            ``Server`` (``dispatch``/``submit`` returning ``Update``; served without ``out=`` and
            without quorum shrinking, as asynchronous rounds).
        store: the job's key-value store (``TCPStore``) every worker can reach.
        num_workers: K; workers are ranks ``0 .. K-1``. Default: ``aggregator.num_workers`` (an
            ``AggregatorLike``; required otherwise).
        params_like: tensors shaped like the global parameters. Default: ``aggregator.global_params``
            (an ``AsyncAggregator``; required otherwise).
        server_rank: the rank (= worker id) running this server; it gets no thread. None: no worker
            runs in the server's process (a server process of its own), every worker is remote.
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
        codec: a ``heloco.codecs`` codec (the workers' must have the same ``config()``, checked at
            HELLO). A worker's encoded Δ is decoded into fp32 buffers by its session's own copy of
            the codec before the aggregator sees it; a message that does not decode (wrong codec or
            layout, truncated, oversized, NaN/Inf, indices out of range) is refused with an ERROR
            and the global model is not touched. None (default): only wire-dtype tensors.
        downlink_codec: ``downlink: delta``: a ``heloco.codecs`` codec (the workers' must have the
            same, checked at HELLO) that encodes each reply as the change of the parameters since
            what that worker holds, which its session keeps (``heloco.distributed.downlink``); the
            first reply on every connection is full. None (default): replies are the parameters.

    Replies to an ``AggregatorLike`` are written straight into each worker's message buffer
    (``out=``), so no parameter copy is allocated per round.

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
        aggregator: Server,
        store: Store,
        num_workers: int | None = None,
        params_like: Sequence[Tensor] | None = None,
        *,
        server_rank: int | None = 0,
        wire_dtype: torch.dtype | None = None,
        timeout: float | datetime.timedelta = 1800.0,
        connect_timeout: float | datetime.timedelta = 300.0,
        rejoin_timeout: float = 0.0,
        prefix: str = "heloco",
        info_capacity: int = 4096,
        shrink_quorum: bool = True,
        codec: Any = None,
        downlink_codec: Any = None,
    ) -> None:
        if not isinstance(aggregator, Server):
            raise ValueError(
                f"aggregator must have callable dispatch() and submit(); got {type(aggregator).__name__}"
            )
        # Decided once: what the server may use besides dispatch/submit (heloco.transport).
        full = isinstance(aggregator, AggregatorLike)
        if not isinstance(shrink_quorum, bool):
            raise ValueError(f"shrink_quorum must be True or False, got {shrink_quorum!r}")
        if not isinstance(store, Store):
            raise ValueError(
                f"store must be a torch.distributed Store (e.g. TCPStore), got {type(store).__name__}"
            )
        if num_workers is None and full:
            num_workers = aggregator.num_workers
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(
                f"num_workers must be an int >= 1 (or taken from the aggregator), got {num_workers!r}"
            )
        if full and aggregator.num_workers != num_workers:
            raise ValueError(
                f"num_workers={num_workers} but the aggregator was built for {aggregator.num_workers} workers"
            )
        if server_rank is not None and (
            isinstance(server_rank, bool)
            or not isinstance(server_rank, int)
            or not 0 <= server_rank < num_workers
        ):
            raise ValueError(
                f"server_rank must be an int in [0, num_workers={num_workers}) or None (no worker in "
                f"the server's process), got {server_rank!r}"
            )
        if params_like is None:
            if not isinstance(aggregator, AsyncAggregator):
                raise ValueError("params_like is required unless the aggregator is an AsyncAggregator")
            params_like = aggregator.global_params
        shapes, dtype = shapes_and_dtype(list(params_like))
        check_wire_dtype(wire_dtype)
        if (
            isinstance(rejoin_timeout, bool)
            or not isinstance(rejoin_timeout, int | float)
            or rejoin_timeout < 0
        ):
            raise ValueError(f"rejoin_timeout must be a number of seconds >= 0, got {rejoin_timeout!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")

        self.aggregator = aggregator
        self._full: AggregatorLike | None = aggregator if full else None
        self._quorum = aggregator.quorum if full else 1  # > 1: synchronous rounds, waited for here
        self.store = store
        self.num_workers = num_workers
        self.server_rank = server_rank
        self.shapes = shapes
        self.dtype = dtype
        self.wire_dtype = wire_dtype or dtype
        self.timeout = as_timedelta(timeout, "timeout")
        self.connect_timeout = as_timedelta(connect_timeout, "connect_timeout")
        self.rejoin_timeout = float(rejoin_timeout)
        self.prefix = prefix
        self.info_capacity = info_capacity
        for name, given in (("codec", codec), ("downlink_codec", downlink_codec)):
            if given is not None and not (
                callable(getattr(given, "config", None)) and callable(getattr(given, "decode", None))
            ):
                raise ValueError(
                    f"{name} must be a heloco.codecs codec (see make_codec), got {type(given).__name__}"
                )
        self.codec = codec
        self.downlink_codec = downlink_codec
        FlatMessage(shapes[:1], self.wire_dtype, info_capacity)  # validate the layout arguments now

        self._cond = threading.Condition()
        self._stopped = False
        self._started = False
        self._active_calls = 0  # threads inside the aggregator right now
        self._releases = [0] * num_workers  # completed quorum rounds a pending worker has not collected
        self._slots = [WorkerSlot(i) for i in range(num_workers)]
        if server_rank is not None:
            self._slots[server_rank].state = "local"
        self._stats_dropped = threading.Event()  # set once a reply went out without its stats
        self.shrink_quorum = shrink_quorum
        self._removed: set[int] = set()  # workers the aggregator took out of the quorum

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
            session = WorkerSession(self, slot, self._cond, self._remove_from_quorum, self._stats_dropped)
            slot.thread = threading.Thread(
                target=session.run, name=f"heloco-server-w{slot.worker_id}", daemon=True
            )
            slot.thread.start()
        logger.info(
            "heloco server (beside worker %s) serving %d remote workers (wire %s)",
            self.server_rank,
            self.num_workers - (self.server_rank is not None),
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
            if out is not None and self._full is not None:  # one pass into the message buffer
                return self._full.dispatch(worker_id, out=out)
            return self.aggregator.dispatch(worker_id)

    def dispatch(self, worker_id: int, *, out: Sequence[Tensor] | None = None) -> Update:
        """The aggregator's ``dispatch``; ``ServerStopped`` after ``stop()``.

        ``out``: tensors to write the parameters into, passed on to an ``AggregatorLike`` (otherwise
        ``Update.params`` are the aggregator's own copies).
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
            if out is not None and self._full is not None:
                update = self._full.submit(worker_id, pseudo_grads, base_version, out=out)
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
        quorum = self._quorum
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
        agg = self._full
        if not self.shrink_quorum or agg is None or self._quorum <= 1:
            return
        try:
            with self._aggregator_call():
                update = agg.remove_worker(worker_id)
        except ServerStopped:
            return
        except Exception:  # the round stays as it was; waiting workers get QuorumUnreachable
            logger.exception("removing worker %d from the quorum failed", worker_id)
            return
        released = [w for w in update.released if w != worker_id]
        logger.info(
            "worker %d removed from the quorum (now %s)%s",
            worker_id,
            agg.effective_quorum,
            f"; its removal completed the round of workers {released}" if released else "",
        )
        with self._cond:
            self._removed.add(worker_id)
            for w in released:
                self._releases[w] += 1
            self._cond.notify_all()
