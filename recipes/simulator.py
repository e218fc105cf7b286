"""The simulator of heterogeneous workers: K virtual workers in one process, in the order a virtual
clock says they arrive.

Each round is the one both modes run (``recipes.worker_round``), spelled out with no hooks:

    pop the next arrival → its H inner steps (``InnerLoop.run``) → ``DiLoCoWorker.sync()``: Δ = θ_start
    − θ_now into its buffer, ``aggregator.submit(Δ, out=θ_start)`` through the in-process transport,
    θ_start copied into the replica

so a round writes four model-sized tensors of its own (Δ, the aggregator's copy of it, the answer,
the replica) besides the outer optimizer's step.

A worker's round is computed when it arrives, from the parameters it was dispatched: the result is
the same as if it had run concurrently, and runs are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from heloco.aggregator import AsyncAggregator, Update
from heloco.simulation import VirtualClock
from heloco.transport import InProcessTransport
from heloco.worker import DiLoCoWorker
from recipes.config import RecipeConfig
from recipes.worker_round import InnerLoop


class SimulatedWorker:
    """One virtual worker: the ``InnerLoop`` of its replica, inner optimizer and data stream, and a
    ``heloco.DiLoCoWorker`` over the in-process transport for θ_start, Δ and ``sync()`` (used
    explicitly, no hooks). Its buffers live on ``buffer_device`` (the host when idle workers are
    offloaded)."""

    def __init__(
        self,
        worker_id: int,
        loop: InnerLoop,
        transport: InProcessTransport,
        inner_steps: int,
        buffer_device: torch.device,
    ) -> None:
        self.worker_id = worker_id
        self.loop = loop
        self.diloco = DiLoCoWorker(
            loop.model, loop.optimizer, transport, worker_id, inner_steps, start_device=buffer_device
        )
        self.buffer_device = buffer_device

    @property
    def inner_steps(self) -> int:
        return self.diloco.sync_every

    @property
    def waiting(self) -> bool:
        return self.diloco.waiting

    def move_to(self, device: torch.device) -> None:
        """Move the replica and its inner-optimizer state (offloading idle workers)."""
        self.loop.model.to(device)
        for state in self.loop.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    state[key] = value.to(device)

    def state_dict(self) -> dict[str, Any]:
        diloco = self.diloco.state_dict()
        return {
            "worker_id": self.worker_id,
            "inner_steps": self.inner_steps,
            "base_version": diloco["base_version"],
            "local_step": self.loop.local_step,
            "waiting": diloco["waiting"],
            "start": diloco["start"],
            "model": self.loop.model.state_dict(),
            "optimizer": self.loop.optimizer.state_dict(),
            "stream": self.loop.stream.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["worker_id"] != self.worker_id:
            raise ValueError(f"state is for worker {state['worker_id']}, this is worker {self.worker_id}")
        self.diloco.load_state_dict(
            {
                "worker_id": self.worker_id,
                "sync_every": state["inner_steps"],
                "base_version": state["base_version"],
                "local_step": state["local_step"],
                "steps_since_sync": 0,
                "waiting": state["waiting"],
                "start": state["start"],
            }
        )
        self.loop.local_step = int(state["local_step"])
        self.loop.model.load_state_dict(state["model"])
        self.loop.optimizer.load_state_dict(state["optimizer"])
        self.loop.stream.load_state_dict(state["stream"])


@dataclass
class Arrival:
    """What one simulated round produced, for the metrics log."""

    time: float
    worker: int
    inner_steps: int
    train_loss: float
    data_checksum: int
    update: Update


class Simulator:
    """Runs the virtual workers' rounds against the aggregator, one arrival at a time."""

    def __init__(
        self,
        config: RecipeConfig,
        aggregator: AsyncAggregator,
        workers: list[SimulatedWorker],
        clock: VirtualClock,
        accelerator: Accelerator,
    ) -> None:
        self.config = config
        self.aggregator = aggregator
        self.workers = workers
        self.clock = clock
        self.accelerator = accelerator
        self.device = accelerator.device
        self.offload = config.diloco.offload_idle_workers

    @property
    def inner_steps_per_worker(self) -> list[int]:
        return [w.inner_steps for w in self.workers]

    @property
    def waiting(self) -> list[int]:
        """Workers whose Δ waits in an open synchronous round."""
        return [w.worker_id for w in self.workers if w.waiting]

    def start(self) -> None:
        """Dispatch the global model to every worker and start their first rounds."""
        for worker in self.workers:
            self.dispatch(worker)

    def dispatch(self, worker: SimulatedWorker) -> None:
        worker.diloco.pull()
        self.clock.start(worker.worker_id, worker.inner_steps)

    def next_time(self) -> float:
        arrival = self.clock.peek()
        if arrival is None:
            raise RuntimeError("no worker in flight (this is a bug)")
        return arrival

    def step(self, progress: Callable[[], float]) -> Arrival:
        """The next worker to arrive runs its round, submits Δ and continues from the answer;
        workers its submission released from a synchronous round start again."""
        now, k = self.clock.pop()
        worker = self.workers[k]
        if self.offload:
            worker.move_to(self.device)
        result = worker.loop.run(worker.inner_steps, progress)
        if self.offload:
            worker.move_to(worker.buffer_device)
        update = self.sync(worker)
        return Arrival(now, k, result.steps, result.train_loss, result.data_checksum, update)

    def sync(self, worker: SimulatedWorker) -> Update:
        """End the worker's round (``DiLoCoWorker.sync``: Δ, submit, continue from the answer, or
        wait for an open synchronous round); the workers the submission released start again."""
        update = worker.diloco.sync()
        if update.params is not None:
            self.clock.start(worker.worker_id, worker.inner_steps)
        for r in update.released:
            self.dispatch(self.workers[r])
        return update

    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock.state_dict(), "workers": [w.state_dict() for w in self.workers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.load_state_dict(state["clock"])
        for worker, worker_state in zip(self.workers, state["workers"], strict=True):
            worker.load_state_dict(worker_state)
