"""An emulated slow link for distributed mode: a transport wrapper that sleeps as long as each
message would take on a link of the given bandwidth and latency.

A module of its own because it is an experiment's tool, not part of the protocol: real runs on one
machine (or one fast cluster) have no slow link, and the question "does overlap hide the network,
does a codec pay off" needs one. The simulator answers it in virtual time
(``heloco.simulation.NetworkModel``); this answers it in real time, on the real gloo path, with the
same meaning of the config fields: a message of ``n`` bytes to the server takes
``uplink_latency + n / uplink_bandwidth`` seconds, a reply of ``m`` bytes
``downlink_latency + m / downlink_bandwidth`` (``None`` bandwidth: no delay for the bytes).

What counts as bytes: an encoded Δ's ``nbytes`` (the codec's message, exactly what the wire carries
besides the fixed header), a plain Δ's or a reply's elements × the wire dtype's size, an encoded
reply's ``nbytes`` (``downlink: delta``: the wrapped transport's ``reply_nbytes``); a request
without a payload (dispatch) costs only the latency. The sleeps happen on the calling thread, in
the transport call: an overlapped worker (``heloco.distributed.overlap``) sleeps in its background
thread, so the link hides behind its next round exactly as a real one would.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from heloco.aggregator import Update

__all__ = ["EmulatedLink", "link_seconds", "reply_payload_nbytes", "wire_itemsize"]


def link_seconds(nbytes: int, bandwidth: float | None, latency: float) -> float:
    """Seconds a message of ``nbytes`` takes on a link: ``latency + nbytes / bandwidth``."""
    return latency + (0.0 if bandwidth is None else nbytes / bandwidth)


def reply_payload_nbytes(transport: Any, worker_id: int, update: Update, wire_itemsize: int) -> int:
    """Bytes of the payload of ``transport``'s latest reply (``update``): what the transport
    measured when it can say (``reply_nbytes``: a ``DistributedTransport``, a ``DeltaDownlink``,
    which may have sent an encoded change), else the parameters' elements × ``wire_itemsize``."""
    measured = getattr(transport, "reply_nbytes", None)
    if callable(measured):
        return int(measured(worker_id))
    return sum(p.numel() for p in update.params or []) * wire_itemsize


def _check_link(name: str, value: float | None, *, bandwidth: bool) -> float | None:
    if value is None and bandwidth:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if bandwidth and value <= 0:
        raise ValueError(f"{name} must be > 0 bytes per second (or None: unlimited), got {value}")
    if not bandwidth and value < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value}")
    return float(value)


class EmulatedLink:
    """Wraps a worker's transport (``DistributedTransport`` or ``InProcessTransport``) and sleeps
    for each message as a link of the given bandwidths (bytes/s) and latencies (s) would take.

    Everything else is the wrapped transport's: ``writes_into_out``, ``pseudo_grad_buffers``,
    ``encoded_buffer``, ``reply_nbytes``, ``leave``. ``wire_itemsize``: bytes per element of a
    plain Δ or a reply of parameters on the wire (4 for fp32, 2 for bf16); an encoded reply
    (``downlink: delta``) costs what the wrapped transport's ``reply_nbytes`` says. Counters
    (``uplink_bytes``, ``downlink_bytes``, ``slept_s``) are written by the thread that calls the
    transport and read once it returned.
    """

    def __init__(
        self,
        transport: Any,
        *,
        uplink_bandwidth: float | None = None,
        uplink_latency: float = 0.0,
        downlink_bandwidth: float | None = None,
        downlink_latency: float = 0.0,
        wire_itemsize: int = 4,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.transport = transport
        self.uplink_bandwidth = _check_link("uplink_bandwidth", uplink_bandwidth, bandwidth=True)
        self.downlink_bandwidth = _check_link("downlink_bandwidth", downlink_bandwidth, bandwidth=True)
        self.uplink_latency = _check_link("uplink_latency", uplink_latency, bandwidth=False) or 0.0
        self.downlink_latency = _check_link("downlink_latency", downlink_latency, bandwidth=False) or 0.0
        if isinstance(wire_itemsize, bool) or not isinstance(wire_itemsize, int) or wire_itemsize < 1:
            raise ValueError(f"wire_itemsize must be an int >= 1 (bytes per element), got {wire_itemsize!r}")
        self.wire_itemsize = wire_itemsize
        self.sleep = sleep
        self.writes_into_out = bool(getattr(transport, "writes_into_out", False))
        self.uplink_bytes = 0
        self.downlink_bytes = 0
        self.slept_s = 0.0
        self._lock = threading.Lock()

    # -- the link ------------------------------------------------------------------------------------
    def _travel(self, nbytes: int, bandwidth: float | None, latency: float, up: bool) -> None:
        seconds = link_seconds(nbytes, bandwidth, latency)
        if seconds > 0:
            self.sleep(seconds)
        with self._lock:
            self.slept_s += seconds
            if up:
                self.uplink_bytes += nbytes
            else:
                self.downlink_bytes += nbytes

    def _up(self, nbytes: int) -> None:
        self._travel(nbytes, self.uplink_bandwidth, self.uplink_latency, up=True)

    def _down(self, worker_id: int, update: Update) -> Update:
        nbytes = reply_payload_nbytes(self.transport, worker_id, update, self.wire_itemsize)
        self._travel(nbytes, self.downlink_bandwidth, self.downlink_latency, up=False)
        return update

    # -- the transport's calls ---------------------------------------------------------------------
    def dispatch(self, worker_id: int, **out: Any) -> Update:
        self._up(0)
        return self._down(worker_id, self.transport.dispatch(worker_id, **out))

    def submit(self, worker_id: int, pseudo_grads: Sequence[Tensor], base_version: int, **out: Any) -> Update:
        self._up(sum(t.numel() for t in pseudo_grads) * self.wire_itemsize)
        return self._down(worker_id, self.transport.submit(worker_id, pseudo_grads, base_version, **out))

    def submit_encoded(self, worker_id: int, message: Any, base_version: int, **out: Any) -> Update:
        self._up(int(message.nbytes))
        return self._down(worker_id, self.transport.submit_encoded(worker_id, message, base_version, **out))

    def leave(self, worker_id: int | None = None) -> None:
        leave = self.transport.leave
        leave() if worker_id is None else leave(worker_id)

    def pseudo_grad_buffers(self) -> list[Tensor]:
        offered = getattr(self.transport, "pseudo_grad_buffers", None)
        return offered() if callable(offered) else []

    def __getattr__(self, name: str) -> Any:
        # encoded_buffer, connected, incarnation, ...: whatever the wrapped transport has
        if name == "transport":
            raise AttributeError(name)
        return getattr(self.transport, name)

    def stats(self) -> dict[str, float]:
        """What went over the emulated link so far."""
        with self._lock:
            return {
                "link_uplink_bytes": self.uplink_bytes,
                "link_downlink_bytes": self.downlink_bytes,
                "link_sleep_s": self.slept_s,
            }


def wire_itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (for ``EmulatedLink(wire_itemsize=...)``)."""
    return torch.empty((), dtype=dtype).element_size()
