"""Overlapped rounds for a worker that is a group of processes (``group_sizes`` with ``overlap``).

Only the leader's server call runs on a background thread; everything the group does together
stays on each rank's own thread, at round boundaries, in the same order on every rank: at a round's
end FSDP's gather of Δ (and the leader's encoding) when the exchange starts, and at the next round's
end the broadcast of the answer when it is waited for. So no collective of the group is ever posted
from a second thread beside DDP's or FSDP's own, which run on the same process group during the round.

The merge rule and the thread-safety rule are those of ``heloco.distributed.overlap``; the leader's
thread touches only its message (encoded before the thread starts) and its transport to the server.
An error of the server call (the Δ refused, the server stopped, a timeout) is raised on every rank by
the broadcast in ``wait``, as ``GroupTransport`` does without overlap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from heloco.distributed.overlap import BackgroundExchange

if TYPE_CHECKING:
    from heloco.aggregator import Update
    from heloco.outgoing import Outgoing
    from heloco.worker import DiLoCoWorker
    from recipes.distributed.groups import GroupTransport

__all__ = ["GroupExchange"]


class GroupExchange:
    """``BackgroundExchange``'s interface (``start``, ``wait``, ``pending``, ``exchanges``) for a
    group's rank: ``transport`` is its ``GroupTransport``, ``worker`` built with ``overlap=True``."""

    def __init__(self, worker: DiLoCoWorker, transport: GroupTransport) -> None:
        self.worker = worker
        self.transport = transport
        self.background = BackgroundExchange(worker)
        self._member_pending = False  # a non-leader's exchange: nothing runs, the broadcast waits
        self.exchanges = 0

    @property
    def pending(self) -> bool:
        """An exchange was started and not yet waited for (on every rank of the group alike)."""
        return self.background.pending or self._member_pending

    def start(self, outgoing: Outgoing) -> None:
        """The gather and the encoding here, on this rank's thread; the leader's server call on a
        background thread."""
        if self.pending:
            raise RuntimeError("an exchange is already in flight; wait() for it first")
        call = self.transport.prepare_submit(
            self.worker.worker_id, outgoing.pseudo_grads, outgoing.base_version
        )
        self.exchanges += 1
        if call is None:
            self.worker.mark_in_flight()
            self._member_pending = True
        else:
            self.background.start(outgoing, call=call)

    def wait(self) -> Update:
        """The answer, broadcast to the group (blocking until the leader has it); raises on every rank
        what the leader's server call raised."""
        if not self.pending:
            raise RuntimeError("no exchange in flight")
        self._member_pending = False
        return self.transport.relay(self.worker.worker_id, self.background.wait)
