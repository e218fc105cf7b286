"""A deterministic virtual clock for simulating heterogeneous workers on one device.

Each worker has a speed in inner steps per virtual second. A round of ``steps`` inner steps that
starts at ``t`` arrives at ``t + steps / speed · j``, where ``j`` is an optional per-round jitter
factor drawn from the worker's own seeded stream (so one worker's jitter never depends on the others'
order). Arrivals are popped in (time, worker id) order: the same seed and speeds give the same
arrival sequence bit for bit, whichever method runs on top.

Given a ``NetworkModel``, the clock also carries messages: a worker's Δ leaves when its round's
compute ends and reaches the server ``latency + nbytes / bandwidth`` later on the worker's uplink; the
server's reply leaves ``server_step_time`` after that and takes the downlink's time to come back.
Every event (a round's compute ends, the server receives a message, a worker receives a reply) is
popped in (time, worker id, kind) order. Without a network (the default) the clock holds only
compute events and behaves exactly as before.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def dylu_steps(speeds: Sequence[float], base_steps: int, power: float = 1.0) -> list[int]:
    """Dynamic Local Updates (Liu et al. 2024, arXiv 2401.09135, Eq. 6): H_w = max(1, ⌊v_w / max v · H⌋),
    so slow workers run fewer inner steps and arrive about as often as fast ones.

    ``power`` α < 1 tempers it (ours): H_w = max(1, ⌊(v_w / max v)^α · H⌋), between DyLU (α = 1) and
    equal rounds (α = 0): a slow worker's Δ is staler than under DyLU but made of more steps."""
    _check_speeds(speeds)
    if base_steps < 1:
        raise ValueError(f"base_steps (H) must be >= 1, got {base_steps}")
    if not (isinstance(power, int | float) and 0.0 <= power <= 1.0):
        raise ValueError(f"power (dylu_power) must be in [0, 1], got {power!r}")
    fastest = max(speeds)
    # the small epsilon keeps an exact product (e.g. (1/4)^0.5 · 20 = 10) from flooring to 9
    return [max(1, math.floor((v / fastest) ** power * base_steps + 1e-9)) for v in speeds]


def _check_speeds(speeds: Sequence[float]) -> None:
    if len(speeds) == 0:
        raise ValueError("worker_speeds must name at least one worker")
    for i, v in enumerate(speeds):
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ValueError(f"worker_speeds[{i}] must be a positive number of steps per second, got {v!r}")


@dataclass(frozen=True)
class Link:
    """One direction of one worker's connection: a message of ``nbytes`` bytes takes
    ``latency + nbytes / bandwidth`` virtual seconds (bandwidth in bytes per virtual second;
    ``math.inf``, the default, with no latency: an instantaneous link, as without a network)."""

    bandwidth: float = math.inf
    latency: float = 0.0

    def __post_init__(self) -> None:
        if not (
            isinstance(self.bandwidth, int | float) and self.bandwidth > 0 and not math.isnan(self.bandwidth)
        ):
            raise ValueError(
                f"a link's bandwidth must be > 0 bytes per second (inf: unlimited), got {self.bandwidth!r}"
            )
        if not (isinstance(self.latency, int | float) and math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError(f"a link's latency must be a finite number >= 0 seconds, got {self.latency!r}")

    def seconds(self, nbytes: int) -> float:
        """Virtual seconds a message of ``nbytes`` bytes takes on this link."""
        if nbytes < 0:
            raise ValueError(f"a message has nbytes >= 0, got {nbytes}")
        return self.latency + nbytes / self.bandwidth

    def as_dict(self) -> dict[str, float | None]:
        """JSON-able (an unlimited bandwidth is ``None``)."""
        return {"bandwidth": None if math.isinf(self.bandwidth) else self.bandwidth, "latency": self.latency}


@dataclass(frozen=True)
class NetworkModel:
    """Every worker's uplink (its Δ to the server) and downlink (the server's reply), and the server's
    time per step.

    ``server_step_time`` is a fixed delay between a message's receipt and its reply leaving; the
    server applies arrivals in the order it receives them, each the moment it is received (it is
    not modelled as a queue: steps that would overlap in time do not push each other back).
    """

    uplinks: tuple[Link, ...]
    downlinks: tuple[Link, ...]
    server_step_time: float = 0.0

    def __post_init__(self) -> None:
        if len(self.uplinks) != len(self.downlinks) or not self.uplinks:
            raise ValueError(
                f"a network needs one uplink and one downlink per worker, got {len(self.uplinks)} uplinks "
                f"and {len(self.downlinks)} downlinks"
            )
        if not (math.isfinite(self.server_step_time) and self.server_step_time >= 0):
            raise ValueError(
                f"server_step_time must be a finite number >= 0 seconds, got {self.server_step_time!r}"
            )

    @classmethod
    def per_worker(
        cls,
        num_workers: int,
        *,
        uplink_bandwidth: Sequence[float] | None = None,
        uplink_latency: Sequence[float] | None = None,
        downlink_bandwidth: Sequence[float] | None = None,
        downlink_latency: Sequence[float] | None = None,
        server_step_time: float = 0.0,
    ) -> NetworkModel:
        """Links from per-worker lists, each with one entry per worker or one for all (``None``:
        unlimited bandwidth, no latency)."""

        def spread(name: str, values: Sequence[float] | None, default: float) -> list[float]:
            if values is None:
                return [default] * num_workers
            if len(values) == 1:
                return [float(values[0])] * num_workers
            if len(values) != num_workers:
                raise ValueError(
                    f"{name} must have one entry per worker ({num_workers}) or one for all, got {len(values)}"
                )
            return [float(v) for v in values]

        up_bw = spread("uplink_bandwidth", uplink_bandwidth, math.inf)
        up_lat = spread("uplink_latency", uplink_latency, 0.0)
        down_bw = spread("downlink_bandwidth", downlink_bandwidth, math.inf)
        down_lat = spread("downlink_latency", downlink_latency, 0.0)
        return cls(
            tuple(Link(b, lat) for b, lat in zip(up_bw, up_lat, strict=True)),
            tuple(Link(b, lat) for b, lat in zip(down_bw, down_lat, strict=True)),
            float(server_step_time),
        )

    @property
    def num_workers(self) -> int:
        return len(self.uplinks)

    def upload_seconds(self, worker_id: int, nbytes: int) -> float:
        """From the worker's send to the server's receipt."""
        return self.uplinks[worker_id].seconds(nbytes)

    def reply_seconds(self, worker_id: int, nbytes: int) -> float:
        """From the server's receipt (or its decision to answer) to the worker's receipt of the reply."""
        return self.server_step_time + self.downlinks[worker_id].seconds(nbytes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "uplinks": [link.as_dict() for link in self.uplinks],
            "downlinks": [link.as_dict() for link in self.downlinks],
            "server_step_time": self.server_step_time,
        }


# What happened at an event of the clock, in the order events of one instant and worker are popped.
COMPUTED = "computed"  # a worker's round finished its inner steps
RECEIVED = "received"  # the server received a worker's message
DELIVERED = "delivered"  # a worker received the server's reply
EVENT_KINDS = (COMPUTED, RECEIVED, DELIVERED)


@dataclass(frozen=True)
class Event:
    """One popped event: when, whose, what (``COMPUTED``, ``RECEIVED``, ``DELIVERED``)."""

    time: float
    worker: int
    kind: str


class VirtualClock:
    """Event queue of worker arrivals in virtual seconds.

    Typical use: ``start(w, H)`` for every worker, then repeatedly ``t, w = pop()``, run that worker's
    round, and ``start(w, H_w)`` again (or, for a pending synchronous quorum, later when released).
    Idle time (between a worker's arrival and its next start) is tracked per worker.

    With a ``network``, ``pop_event()`` returns every kind of event; ``upload_done``/``reply_done``
    say when a message sent now arrives and ``schedule`` queues its event (a worker waiting for a
    reply is idle: its next ``start`` comes later).
    """

    def __init__(
        self,
        speeds: Sequence[float],
        jitter: float = 0.0,
        seed: int = 0,
        network: NetworkModel | None = None,
    ) -> None:
        _check_speeds(speeds)
        if network is not None and network.num_workers != len(speeds):
            raise ValueError(
                f"the network has links for {network.num_workers} workers, the clock {len(speeds)}"
            )
        if not (0.0 <= jitter < 1.0):
            raise ValueError(
                f"jitter must be in [0, 1) (relative spread of a round's duration), got {jitter}"
            )
        self.speeds = [float(v) for v in speeds]
        self.jitter = float(jitter)
        self.seed = int(seed)
        self.now = 0.0
        self.network = network
        self._queue: list[tuple[float, int]] = []  # compute ends: (time, worker)
        self._transit: list[tuple[float, int, int]] = []  # messages: (time, worker, kind's index)
        self._rngs = [np.random.default_rng([self.seed, w]) for w in range(len(speeds))]
        self.busy = [0.0] * len(speeds)
        self.idle = [0.0] * len(speeds)
        self._arrived_at: list[float | None] = [None] * len(speeds)

    @property
    def num_workers(self) -> int:
        return len(self.speeds)

    def duration(self, worker_id: int, steps: int) -> float:
        """Virtual seconds a round of ``steps`` inner steps takes (draws the worker's next jitter)."""
        factor = 1.0
        if self.jitter > 0:
            factor = 1.0 + self.jitter * float(self._rngs[worker_id].uniform(-1.0, 1.0))
        return steps / self.speeds[worker_id] * factor

    def start(self, worker_id: int, steps: int) -> float:
        """Worker begins a round now; returns its arrival time."""
        if self.in_flight(worker_id):
            raise RuntimeError(f"worker {worker_id} already has a round in flight")
        if self._arrived_at[worker_id] is not None:
            self.idle[worker_id] += self.now - self._arrived_at[worker_id]
            self._arrived_at[worker_id] = None
        took = self.duration(worker_id, steps)
        self.busy[worker_id] += took
        arrival = self.now + took
        heapq.heappush(self._queue, (arrival, worker_id))
        return arrival

    def pop(self) -> tuple[float, int]:
        """Next arrival (earliest time, lowest worker id on ties); advances ``now`` to it. Without a
        network every event is a round's end; with one, use ``pop_event``."""
        if self._transit_first():
            raise RuntimeError("the next event is a message, not a round's end; use pop_event()")
        event = self.pop_event()
        return event.time, event.worker

    def pop_event(self) -> Event:
        """The next event in (time, worker id, kind) order; advances ``now`` to it. A round's end
        starts the worker's idle time (until its next ``start``)."""
        if self._transit_first():
            at, worker_id, kind = heapq.heappop(self._transit)
            self.now = at
            return Event(at, worker_id, EVENT_KINDS[kind])
        if not self._queue:
            raise RuntimeError("no round in flight")
        arrival, worker_id = heapq.heappop(self._queue)
        self.now = arrival
        self._arrived_at[worker_id] = arrival
        return Event(arrival, worker_id, COMPUTED)

    def _transit_first(self) -> bool:
        if not self._transit:
            return False
        if not self._queue:
            return True
        return self._transit[0] < (*self._queue[0], 0)

    def peek(self) -> float | None:
        """The next event's time (None: nothing in flight)."""
        times = [q[0][0] for q in (self._queue, self._transit) if q]
        return min(times) if times else None

    def in_flight(self, worker_id: int) -> bool:
        """The worker's round is computing (its end is queued)."""
        return any(w == worker_id for _, w in self._queue)

    def upload_done(self, worker_id: int, nbytes: int) -> float:
        """When a message of ``nbytes`` the worker sends now reaches the server (``now`` without a
        network)."""
        if self.network is None:
            return self.now
        return self.now + self.network.upload_seconds(worker_id, nbytes)

    def reply_done(self, worker_id: int, nbytes: int) -> float:
        """When a reply of ``nbytes`` to a message the server has now reaches the worker (after the
        server's step and the worker's downlink; ``now`` without a network)."""
        if self.network is None:
            return self.now
        return self.now + self.network.reply_seconds(worker_id, nbytes)

    def schedule(self, at: float, worker_id: int, kind: str) -> None:
        """Queue a message's event (``RECEIVED`` or ``DELIVERED``) at virtual time ``at``."""
        if kind not in (RECEIVED, DELIVERED):
            raise ValueError(f"schedule takes {RECEIVED!r} or {DELIVERED!r}, got {kind!r}")
        if at < self.now:
            raise ValueError(f"an event cannot happen before now ({at} < {self.now})")
        heapq.heappush(self._transit, (float(at), int(worker_id), EVENT_KINDS.index(kind)))

    def state_dict(self) -> dict[str, Any]:
        return {
            "speeds": list(self.speeds),
            "jitter": self.jitter,
            "seed": self.seed,
            "now": self.now,
            "queue": [list(item) for item in self._queue],
            "transit": [list(item) for item in self._transit],
            "network": None if self.network is None else self.network.as_dict(),
            "rngs": [rng.bit_generator.state for rng in self._rngs],
            "busy": list(self.busy),
            "idle": list(self.idle),
            "arrived_at": list(self._arrived_at),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["speeds"]) != self.speeds:
            raise ValueError(f"clock state was saved with worker_speeds {state['speeds']}, not {self.speeds}")
        self.jitter = float(state["jitter"])
        self.seed = int(state["seed"])
        self.now = float(state["now"])
        network = None if self.network is None else self.network.as_dict()
        if state.get("network") != network:
            raise ValueError(f"clock state was saved with network {state.get('network')}, not {network}")
        self._queue = [(float(t), int(w)) for t, w in state["queue"]]
        heapq.heapify(self._queue)
        self._transit = [(float(t), int(w), int(k)) for t, w, k in state.get("transit", [])]
        heapq.heapify(self._transit)
        for rng, rng_state in zip(self._rngs, state["rngs"], strict=True):
            rng.bit_generator.state = rng_state
        self.busy = [float(x) for x in state["busy"]]
        self.idle = [float(x) for x in state["idle"]]
        self._arrived_at = [None if x is None else float(x) for x in state["arrived_at"]]
