"""A deterministic virtual clock for simulating heterogeneous workers on one device.

Each worker has a speed in inner steps per virtual second. A round of ``steps`` inner steps that
starts at ``t`` arrives at ``t + steps / speed · j``, where ``j`` is an optional per-round jitter
factor drawn from the worker's own seeded stream (so one worker's jitter never depends on the others'
order). Arrivals are popped in (time, worker id) order: the same seed and speeds give the same
arrival sequence bit for bit, whichever method runs on top.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def dylu_steps(speeds: Sequence[float], base_steps: int) -> list[int]:
    """Dynamic Local Updates (Liu et al. 2024, arXiv 2401.09135, Eq. 6): H_w = max(1, ⌊v_w / max v · H⌋),
    so slow workers run fewer inner steps and arrive about as often as fast ones."""
    _check_speeds(speeds)
    if base_steps < 1:
        raise ValueError(f"base_steps (H) must be >= 1, got {base_steps}")
    fastest = max(speeds)
    return [max(1, math.floor(v / fastest * base_steps)) for v in speeds]


def _check_speeds(speeds: Sequence[float]) -> None:
    if len(speeds) == 0:
        raise ValueError("worker_speeds must name at least one worker")
    for i, v in enumerate(speeds):
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ValueError(f"worker_speeds[{i}] must be a positive number of steps per second, got {v!r}")


class VirtualClock:
    """Event queue of worker arrivals in virtual seconds.

    Typical use: ``start(w, H)`` for every worker, then repeatedly ``t, w = pop()``, run that worker's
    round, and ``start(w, H_w)`` again (or, for a pending synchronous quorum, later when released).
    Idle time (between a worker's arrival and its next start) is tracked per worker.
    """

    def __init__(self, speeds: Sequence[float], jitter: float = 0.0, seed: int = 0) -> None:
        _check_speeds(speeds)
        if not (0.0 <= jitter < 1.0):
            raise ValueError(
                f"jitter must be in [0, 1) (relative spread of a round's duration), got {jitter}"
            )
        self.speeds = [float(v) for v in speeds]
        self.jitter = float(jitter)
        self.seed = int(seed)
        self.now = 0.0
        self._queue: list[tuple[float, int]] = []
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
        if any(w == worker_id for _, w in self._queue):
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
        """Next arrival (earliest time, lowest worker id on ties); advances ``now`` to it."""
        if not self._queue:
            raise RuntimeError("no round in flight")
        arrival, worker_id = heapq.heappop(self._queue)
        self.now = arrival
        self._arrived_at[worker_id] = arrival
        return arrival, worker_id

    def peek(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "speeds": list(self.speeds),
            "jitter": self.jitter,
            "seed": self.seed,
            "now": self.now,
            "queue": [list(item) for item in self._queue],
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
        self._queue = [(float(t), int(w)) for t, w in state["queue"]]
        heapq.heapify(self._queue)
        for rng, rng_state in zip(self._rngs, state["rngs"], strict=True):
            rng.bit_generator.state = rng_state
        self.busy = [float(x) for x in state["busy"]]
        self.idle = [float(x) for x in state["idle"]]
        self._arrived_at = [None if x is None else float(x) for x in state["arrived_at"]]
