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

With a network (``heloco.simulation.NetworkModel``, from the config's link fields) a round's end is
three events of the virtual clock, and ``sync()`` is cut into its three steps:

    COMPUTED   its inner steps are done: ``outgoing()`` (Δ, encoded with the codec if any), sent now
    RECEIVED   the server has it (after the uplink's time for ``message.nbytes``): ``send()`` steps the
               aggregator (an arrival of the metrics log), ``receive()`` keeps the reply's values
    DELIVERED  the reply reaches the worker (after the server's step and the downlink's time): the
               worker's next round starts (without overlap: it was idle meanwhile)

A step handles one event and what follows from it at the same instant (on an instantaneous link the
message is received, and the reply delivered, in the same step, so without a network a step is one
whole round, as before), with at most one arrival per step.

With ``overlap``, a worker starts its next round when it sends, and merges the reply at that round's
end (``heloco.worker``: θ ← θ_reply + (θ_now − θ_sent)); if the reply has not been delivered by then
it waits for it, idle. A reply's values are fixed when the server answers (the aggregator writes them
into θ_start at once); the network only decides when the worker may use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from heloco.aggregator import AsyncAggregator, Update
from heloco.codecs import Codec, ErrorFeedback, make_codec
from heloco.outgoing import Encoder, Outgoing, tensor_bytes
from heloco.simulation import COMPUTED, DELIVERED, RECEIVED, Event, NetworkModel, VirtualClock
from heloco.transport import DeltaDownlink, InProcessTransport
from heloco.worker import DiLoCoWorker
from recipes.config import NETWORK_FIELDS, RecipeConfig
from recipes.worker_round import InnerLoop, RoundResult


def network_model(config: RecipeConfig) -> NetworkModel | None:
    """The configured links, or None when none is set (an instantaneous network: the clock as before)."""
    o = config.diloco
    if all(getattr(o, name) is None for name in NETWORK_FIELDS) and o.server_step_time == 0.0:
        return None
    return NetworkModel.per_worker(
        o.num_workers,
        uplink_bandwidth=o.uplink_bandwidth,
        uplink_latency=o.uplink_latency,
        downlink_bandwidth=o.downlink_bandwidth,
        downlink_latency=o.downlink_latency,
        server_step_time=o.server_step_time,
    )


def configured_codec(config: RecipeConfig, name: str) -> Codec:
    """The codec ``name`` with the config's options for it (int8_block, topk_*)."""
    o = config.diloco
    options = {
        "fp32": {},
        "bf16": {},
        "int8": {"block": o.int8_block},
        "topk": {
            "fraction": o.topk_fraction,
            "bits": o.topk_bits,
            "chunk": o.topk_chunk,
            "scope": o.topk_scope,
        },
    }
    return make_codec(name, **options[name])


def uplink_codec(config: RecipeConfig) -> Codec | None:
    """The configured codec of Δ, with its options; None for fp32 (Δ's tensors are the message,
    exactly as without a codec: fp32 is lossless, so error feedback would keep a residual of zero)."""
    if config.diloco.uplink_codec == "fp32":
        return None
    return configured_codec(config, config.diloco.uplink_codec)


def server_transport(config: RecipeConfig, aggregator: AsyncAggregator) -> InProcessTransport | DeltaDownlink:
    """The workers' transport: the server decodes Δ with the uplink codec; with ``downlink: delta``
    its replies are the encoded change since each worker's copy (``DeltaDownlink``)."""
    transport = InProcessTransport(aggregator, codec=uplink_codec(config))
    if config.diloco.downlink == "params":
        return transport
    codec = configured_codec(config, config.diloco.downlink_codec)
    return DeltaDownlink(transport, codec, aggregator.global_params)


def uplink_encoder(config: RecipeConfig) -> Encoder | None:
    """One worker's encoder of Δ: the codec, in its own ``ErrorFeedback`` (a residual per worker) if
    asked; None for fp32."""
    codec = uplink_codec(config)
    if codec is None or not config.diloco.error_feedback:
        return codec
    return ErrorFeedback(codec, decay=config.diloco.error_feedback_decay)


@dataclass
class InTransit:
    """A worker's message between its send and the server's receipt, with what its round measured."""

    outgoing: Outgoing
    result: RoundResult


class SimulatedWorker:
    """One virtual worker: the ``InnerLoop`` of its replica, inner optimizer and data stream, and a
    ``heloco.DiLoCoWorker`` over the in-process transport for θ_start, Δ and ``sync()`` (used
    explicitly, no hooks). Its buffers live on ``buffer_device`` (the host when idle workers are
    offloaded)."""

    def __init__(
        self,
        worker_id: int,
        loop: InnerLoop,
        transport: InProcessTransport | DeltaDownlink,
        inner_steps: int,
        buffer_device: torch.device,
        *,
        codec: Encoder | None = None,
        overlap: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self.loop = loop
        self.diloco = DiLoCoWorker(
            loop.model,
            loop.optimizer,
            transport,
            worker_id,
            inner_steps,
            start_device=buffer_device,
            codec=codec,
            overlap=overlap,
        )
        self.buffer_device = buffer_device
        self.transport = transport
        self.in_transit: InTransit | None = None  # its Δ on the uplink
        self.reply_on_the_way = False  # a reply is on the downlink
        self.at_boundary: RoundResult | None = None  # overlap: its round ended, the reply not yet here

    @property
    def inner_steps(self) -> int:
        return self.diloco.sync_every

    @property
    def waiting(self) -> bool:
        return self.diloco.waiting

    @property
    def overlap(self) -> bool:
        return self.diloco.overlap

    @property
    def reply_missing(self) -> bool:
        """The reply to its last message has not reached it (still on the uplink, at the server in an
        open synchronous round, or on the downlink)."""
        return self.in_transit is not None or self.diloco.awaiting_reply or self.reply_on_the_way

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
            **{key: diloco[key] for key in ("overlap", "codec") if key in diloco},
            "network": {
                "in_transit": None
                if self.in_transit is None
                else _transit_state(self.in_transit, self.transport),
                "reply_on_the_way": self.reply_on_the_way,
                "at_boundary": None if self.at_boundary is None else _result_state(self.at_boundary),
            },
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
                **{key: state[key] for key in ("overlap", "codec") if key in state},
            }
        )
        self.loop.local_step = int(state["local_step"])
        self.loop.model.load_state_dict(state["model"])
        self.loop.optimizer.load_state_dict(state["optimizer"])
        self.loop.stream.load_state_dict(state["stream"])
        network = state.get("network", {})
        transit = network.get("in_transit")
        self.in_transit = None if transit is None else _transit_from_state(transit, self.buffer_device)
        self.reply_on_the_way = bool(network.get("reply_on_the_way", False))
        boundary = network.get("at_boundary")
        self.at_boundary = None if boundary is None else RoundResult(**boundary)


def _result_state(result: RoundResult) -> dict[str, Any]:
    return {"steps": result.steps, "train_loss": result.train_loss, "data_checksum": result.data_checksum}


def _transit_state(transit: InTransit, transport: InProcessTransport | DeltaDownlink) -> dict[str, Any]:
    """A message on the uplink, for a checkpoint: what the server will read from it (Δ's tensors, or
    an encoded message's decoded fp32 values: decoding is a pure function, so the server steps on the
    same values after a resume) and its size on the wire."""
    out = transit.outgoing
    grads = out.pseudo_grads if out.message is None else transport.decode(out.message)
    return {
        "base_version": out.base_version,
        "nbytes": out.nbytes,
        "pseudo_grads": [t.detach().clone() for t in grads],
        "result": _result_state(transit.result),
    }


def _transit_from_state(state: dict[str, Any], device: torch.device) -> InTransit:
    outgoing = Outgoing(
        int(state["base_version"]),
        int(state["nbytes"]),
        pseudo_grads=[t.to(device) for t in state["pseudo_grads"]],
    )
    return InTransit(outgoing, RoundResult(**state["result"]))


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
    """Runs the virtual workers' rounds against the aggregator, one event of the clock at a time
    (without a network: one arrival at a time)."""

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
        self.reply_nbytes = tensor_bytes(aggregator.global_params)  # the fp32 parameters

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
        """The first parameters, at the start: every worker begins at once."""
        worker.diloco.pull()
        self.clock.start(worker.worker_id, worker.inner_steps)

    def next_time(self) -> float:
        """When the next event happens (without a network: the next arrival)."""
        arrival = self.clock.peek()
        if arrival is None:
            raise RuntimeError("no worker in flight (this is a bug)")
        return arrival

    def step(self, progress: Callable[[], float]) -> Arrival | None:
        """The clock's next event and what follows from it at the same instant; returns the arrival
        at the server if there was one. Without a network: the next worker to arrive runs its round,
        submits Δ and continues from the answer, and the workers its submission released from a
        synchronous round start again."""
        event = self.clock.pop_event()
        worker = self.workers[event.worker]
        if event.kind == COMPUTED:
            result = self.run_round(worker, progress)
            if worker.overlap and worker.reply_missing:
                worker.at_boundary = result  # it waits for the reply to its previous round
                return None
            return self.round_boundary(worker, result, chain=True)
        if event.kind == RECEIVED:
            return self.receive(worker, event)
        assert event.kind == DELIVERED
        return self.deliver(worker, chain=True)

    def run_round(self, worker: SimulatedWorker, progress: Callable[[], float]) -> RoundResult:
        """The worker's H inner steps, from its replica as it is (a round is computed whole)."""
        if self.offload:
            worker.move_to(self.device)
        result = worker.loop.run(worker.inner_steps, progress)
        if self.offload:
            worker.move_to(worker.buffer_device)
        return result

    def round_boundary(self, worker: SimulatedWorker, result: RoundResult, *, chain: bool) -> Arrival | None:
        """The round ended and the worker may send: Δ (overlapping: after the merge), then it starts
        its next round now if overlapping; the message is received at once on an instantaneous
        uplink when ``chain`` (at most one arrival per step)."""
        outgoing = worker.diloco.outgoing()
        worker.at_boundary = None
        if worker.overlap:
            self.clock.start(worker.worker_id, worker.inner_steps)
        worker.in_transit = InTransit(outgoing, result)
        received = self.clock.upload_done(worker.worker_id, outgoing.nbytes)
        if chain and received == self.clock.now:
            return self.receive(worker, Event(received, worker.worker_id, RECEIVED))
        self.clock.schedule(received, worker.worker_id, RECEIVED)
        return None

    def receive(self, worker: SimulatedWorker, event: Event) -> Arrival:
        """The server has the worker's message: the aggregator steps (``send``), the reply's values
        are fixed now (``receive``), and it and the replies to the workers a completed synchronous
        round released go out on their downlinks."""
        transit = worker.in_transit
        assert transit is not None, f"worker {worker.worker_id} has no message in flight"
        worker.in_transit = None
        update = worker.diloco.send(transit.outgoing)
        worker.diloco.receive(update)
        if update.params is not None:
            self.reply(worker)
        for r in update.released:
            released = self.workers[r]
            released.diloco.pull()
            self.reply(released)
        result = transit.result
        return Arrival(
            event.time, worker.worker_id, result.steps, result.train_loss, result.data_checksum, update
        )

    def reply(self, worker: SimulatedWorker) -> None:
        """The reply leaves the server now; delivered at once on an instantaneous downlink."""
        delivered = self.clock.reply_done(worker.worker_id, self.reply_bytes(worker))
        worker.reply_on_the_way = True
        if delivered == self.clock.now:
            self.deliver(worker, chain=False)
        else:
            self.clock.schedule(delivered, worker.worker_id, DELIVERED)

    def reply_bytes(self, worker: SimulatedWorker) -> int:
        """The reply's size on the downlink: the fp32 parameters, or (``downlink: delta``) the
        encoded change the transport just made for this worker."""
        if isinstance(worker.transport, DeltaDownlink):
            return worker.transport.reply_nbytes(worker.worker_id)
        return self.reply_nbytes

    def deliver(self, worker: SimulatedWorker, *, chain: bool) -> Arrival | None:
        """The reply is at the worker: it starts its next round (it was idle since its round
        ended); overlapping, it goes on from the round boundary it was waiting at, if any."""
        worker.reply_on_the_way = False
        if not worker.overlap:
            self.clock.start(worker.worker_id, worker.inner_steps)
            return None
        if worker.at_boundary is not None and not worker.reply_missing:
            return self.round_boundary(worker, worker.at_boundary, chain=chain)
        return None

    def state_dict(self) -> dict[str, Any]:
        state = {"clock": self.clock.state_dict(), "workers": [w.state_dict() for w in self.workers]}
        transport = self.workers[0].transport
        if isinstance(transport, DeltaDownlink):  # only then: a default run's checkpoint is unchanged
            state["downlink"] = transport.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.load_state_dict(state["clock"])
        transport = self.workers[0].transport
        if isinstance(transport, DeltaDownlink):
            transport.load_state_dict(state["downlink"])
        for worker, worker_state in zip(self.workers, state["workers"], strict=True):
            worker.load_state_dict(worker_state)
