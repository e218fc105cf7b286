"""The simulator of heterogeneous workers: K virtual workers in one process, in the order a virtual
clock says they arrive.

Each round is spelled out, with no hooks and no transport in between:

    pop the next arrival → its H inner steps → Δ = θ_start − θ_now into a preallocated buffer →
    ``aggregator.submit(Δ, out=θ_start)`` → θ_start copied into the replica

so a round writes four model-sized tensors of its own (Δ, the aggregator's copy of it, the answer,
the replica) besides the outer optimizer's step. Users' own loops keep ``heloco.DiLoCoWorker``, whose
hooks do the same for an unchanged training loop.

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
from recipes.common import begin_round, inner_step, set_inner_lr
from recipes.config import RecipeConfig
from recipes.data import TokenStream


class SimulatedWorker:
    """One virtual worker: its replica, inner optimizer, data stream and the round's two buffers
    (θ_start, where the server's answer lands, and Δ). Buffers live on ``buffer_device`` (the host
    when idle workers are offloaded)."""

    def __init__(
        self,
        worker_id: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        stream: TokenStream,
        inner_steps: int,
        buffer_device: torch.device,
    ) -> None:
        self.worker_id = worker_id
        self.model = model
        self.optimizer = optimizer
        self.stream = stream
        self.inner_steps = inner_steps
        self.params = list(model.parameters())
        self.start = [torch.empty_like(p, device=buffer_device) for p in self.params]
        self.delta = [torch.empty_like(p, device=buffer_device) for p in self.params]
        self.base_version: int | None = None
        self.local_step = 0
        self.waiting = False

    @torch.no_grad()
    def pseudo_gradient(self) -> list[torch.Tensor]:
        """Δ = θ_start − θ_now, written into the Δ buffers in one pass."""
        for d, s, p in zip(self.delta, self.start, self.params, strict=True):
            torch.sub(s, p.detach(), out=d)
        return self.delta

    @torch.no_grad()
    def take(self, update: Update) -> None:
        """The server wrote the parameters to continue from into θ_start: copy them into the replica."""
        torch._foreach_copy_([p.data for p in self.params], self.start)
        self.base_version = update.version
        self.waiting = False

    def move_to(self, device: torch.device) -> None:
        """Move the replica and its inner-optimizer state (offloading idle workers)."""
        self.model.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    state[key] = value.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "inner_steps": self.inner_steps,
            "base_version": self.base_version,
            "local_step": self.local_step,
            "waiting": self.waiting,
            "start": [s.detach().clone() for s in self.start],
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "stream": self.stream.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["worker_id"] != self.worker_id:
            raise ValueError(f"state is for worker {state['worker_id']}, this is worker {self.worker_id}")
        self.inner_steps = int(state["inner_steps"])
        self.base_version = state["base_version"]
        self.local_step = int(state["local_step"])
        self.waiting = bool(state["waiting"])
        torch._foreach_copy_(self.start, list(state["start"]))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])


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
        worker.take(self.aggregator.dispatch(worker.worker_id, out=worker.start))
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
        loss, checksum = self.inner_steps(worker, progress)
        update = self.sync(worker)
        return Arrival(now, k, worker.inner_steps, loss, checksum, update)

    def sync(self, worker: SimulatedWorker) -> Update:
        """End the worker's round: Δ, submit, continue from the answer (or wait for an open
        synchronous round); the workers the submission released start their next round."""
        update = self.aggregator.submit(
            worker.worker_id, worker.pseudo_gradient(), worker.base_version, out=worker.start
        )
        if update.params is None:
            worker.waiting = True
        else:
            worker.take(update)
            self.clock.start(worker.worker_id, worker.inner_steps)
        for r in update.released:
            self.dispatch(self.workers[r])
        return update

    def inner_steps(self, worker: SimulatedWorker, progress: Callable[[], float]) -> tuple[float, int]:
        """H inner steps on the worker's own shard; returns the mean loss and a checksum of the
        tokens seen (equal across methods at equal seeds)."""
        config, optimizer = self.config, worker.optimizer
        per_step_lr = config.train.lr_schedule == "worker_cosine"
        begin_round(config, optimizer)
        set_inner_lr(config, optimizer, progress(), worker.local_step)
        if self.offload:
            worker.move_to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        checksum = 0
        for _ in range(worker.inner_steps):
            if per_step_lr:
                set_inner_lr(config, optimizer, progress(), worker.local_step)
            batch = worker.stream.next_batch()
            checksum += int(batch.sum())
            loss_sum += inner_step(
                worker.model, optimizer, batch.to(self.device), self.accelerator, config.train.grad_clip
            )
            worker.local_step += 1
        if self.offload:
            worker.move_to(worker.start[0].device)
        return float(loss_sum) / worker.inner_steps, checksum

    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock.state_dict(), "workers": [w.state_dict() for w in self.workers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.load_state_dict(state["clock"])
        for worker, worker_state in zip(self.workers, state["workers"], strict=True):
            worker.load_state_dict(worker_state)
