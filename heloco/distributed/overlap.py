"""Overlapped rounds on a real transport: the exchange (send Δ, wait for the reply) runs on a
background thread while the worker trains its next round.

A module of its own because it is the one place in distributed mode where two threads share a
worker, so the rule for who touches what is written down once, here.

The rule for the reply is the simulator's (``heloco.worker.DiLoCoWorker``, ``overlap=True``): the
reply to round k is merged at the end of round k+1, ``θ ← θ_reply + (θ_now − θ_sent)``,
``θ_start ← θ_reply``, and round k+1's Δ = θ_sent − θ_now is sent with the reply's version as base.

Thread safety, by ownership:

- the background thread runs ``DiLoCoWorker.transmit(outgoing)`` only (or the ``call`` given to
  ``start`` in its place, bound by the same rule: a group's leader passes its server call, its
  message already encoded): it reads the message (an
  encoded payload already in the transport's send buffer, or Δ's buffers, which the worker does not
  write again before the next round's end), uses the transport (its gloo pair group and buffers;
  ``DistributedTransport`` talks to the server over a two-member group of its own, so no other
  thread posts on it), and, for a transport that writes its answer into given tensors (the server
  rank's in-process transport), writes θ_start;
- the worker's own thread owns everything else: the model's parameters, the inner optimizer, θ_sent,
  Δ's buffers, the codec's residual; it reads θ_start and touches the transport only after ``wait()``
  returned, and marks the message in flight (``mark_in_flight``) before the thread starts;
- the hand-over is a ``concurrent.futures.Future``: ``set_result``/``set_exception`` in the thread
  and ``result()`` in the worker's thread synchronise on its lock, so everything the thread wrote
  (θ_start, the receive buffer) is visible once ``wait()`` returns.

Failures surface: an exception in the thread (the connection lost or timed out, the server stopped,
the Δ refused) is stored in the future and raised by ``wait()`` in the worker's thread, at the next
round boundary. The thread cannot hang forever: every gloo operation has the transport's timeout.
It is a daemon thread, so a worker that ends by an exception is not kept alive by it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from heloco.aggregator import Update
    from heloco.outgoing import Outgoing
    from heloco.worker import DiLoCoWorker

__all__ = ["BackgroundExchange"]


class BackgroundExchange:
    """At most one exchange of ``worker`` in flight on a background thread.

    ``start(outgoing)`` marks the message in flight and hands it to a new daemon thread;
    ``wait()`` returns its ``Update`` (or raises what the thread raised); ``pending`` says whether one
    was started and not yet waited for. Call both from the worker's own thread.
    """

    def __init__(self, worker: DiLoCoWorker) -> None:
        if not getattr(worker, "overlap", False):
            raise ValueError("BackgroundExchange needs a worker built with overlap=True")
        self.worker = worker
        self._future: Future[Update] | None = None
        self._thread: threading.Thread | None = None
        self.exchanges = 0

    @property
    def pending(self) -> bool:
        return self._future is not None

    def start(self, outgoing: Outgoing, call: Callable[[], Update] | None = None) -> None:
        """Send ``outgoing`` and wait for its reply on a background thread. ``call`` replaces
        ``worker.transmit(outgoing)`` as what the thread runs (a group's leader: its server call
        alone, the group's collectives staying on the worker's thread); the same rule applies to it."""
        if self._future is not None:
            raise RuntimeError("an exchange is already in flight; wait() for it first")
        self.worker.mark_in_flight()
        future: Future[Update] = Future()
        future.set_running_or_notify_cancel()
        thread = threading.Thread(
            target=self._run,
            args=(call or (lambda: self.worker.transmit(outgoing)), future),
            name=f"heloco-exchange-w{self.worker.worker_id}",
            daemon=True,
        )
        self._future, self._thread = future, thread
        self.exchanges += 1
        thread.start()

    @staticmethod
    def _run(call: Callable[[], Update], future: Future[Update]) -> None:
        try:
            update = call()
        except BaseException as e:  # surfaces in wait(), on the worker's thread
            future.set_exception(e)
        else:
            future.set_result(update)

    def wait(self, timeout: float | None = None) -> Update:
        """The reply to the exchange in flight (blocking until it arrived); raises what the thread
        raised. ``TimeoutError`` after ``timeout`` seconds (the exchange stays pending)."""
        if self._future is None:
            raise RuntimeError("no exchange in flight")
        future, thread = self._future, self._thread
        try:
            return future.result(timeout)
        finally:
            if future.done():  # answered or failed: the thread is ending, the worker owns all again
                self._future = self._thread = None
                if thread is not None:
                    thread.join()
