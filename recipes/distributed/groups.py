"""Workers that are groups of processes: worker k is ``group_sizes[k]`` consecutive ranks training
one replica with data parallelism inside (DDP, or FSDP2's ``fully_shard``).

Who talks to the server: the group's first rank. It sends the group's Δ and broadcasts the answer to
the others (``GroupTransport``), so the server sees one worker per group whatever its size. The
alternative, every rank sending its own shard over a connection of its own, saves the gather but
needs a server that knows the shards and P times the connections; benchmarks/groups.py measures
both costs side by side (docs/distributed.md has the numbers behind this choice).

Data: a group reads its worker's shard with a batch of size × ``batch_size`` sequences per inner step
(the same stream the simulator reads for that worker), and each rank takes its own consecutive slice,
so a group of P on the global batch computes what one process computes on it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from heloco.aggregator import Update
from heloco.transport import QuorumUnreachable, ServerStopped, TransportError
from recipes.data import TokenStream

__all__ = ["GroupLayout", "GroupSlice", "GroupTransport", "new_worker_groups", "shard_like", "wrap_for_group"]


@dataclass(frozen=True)
class GroupLayout:
    """Which ranks make up which worker: consecutive blocks of ``sizes``, from ``first_rank`` (1 when
    rank 0 is a server process of its own, which belongs to no worker)."""

    sizes: tuple[int, ...]
    first_rank: int = 0

    @property
    def world(self) -> int:
        return self.first_rank + sum(self.sizes)

    @property
    def num_workers(self) -> int:
        return len(self.sizes)

    def ranks_of(self, worker: int) -> list[int]:
        first = self.first_rank + sum(self.sizes[:worker])
        return list(range(first, first + self.sizes[worker]))

    def worker_of(self, rank: int) -> int | None:
        """The worker ``rank`` belongs to (None: the server process)."""
        if 0 <= rank < self.first_rank:
            return None
        for worker in range(self.num_workers):
            if rank in self.ranks_of(worker):
                return worker
        raise ValueError(f"rank {rank} is outside the {self.world} ranks of group_sizes {list(self.sizes)}")

    def leader_of(self, worker: int) -> int:
        """The rank that talks to the server for ``worker``."""
        return self.ranks_of(worker)[0]

    def is_leader(self, rank: int) -> bool:
        worker = self.worker_of(rank)
        return worker is not None and rank == self.leader_of(worker)


def new_worker_groups(layout: GroupLayout, timeout: datetime.timedelta) -> dict[int, Any]:
    """One process group per worker of more than one rank (every rank creates all of them, in the same
    order, as ``dist.new_group`` requires): NCCL on GPUs, gloo on CPUs."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    groups = {}
    for worker, size in enumerate(layout.sizes):
        if size > 1:
            groups[worker] = dist.new_group(layout.ranks_of(worker), backend=backend, timeout=timeout)
    return groups


def wrap_for_group(
    model: torch.nn.Module, group: Any, parallelism: str, device: torch.device
) -> torch.nn.Module:
    """The replica a group trains: DDP over the group (gradients averaged at every step), or FSDP2
    (``fully_shard``: each rank holds a shard of every parameter) on a one-dimensional mesh of it."""
    if parallelism == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, process_group=group, device_ids=device_ids)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, device_type=device.type)
    return fully_shard(model, mesh=mesh)


def shard_like(state: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """An optimizer state dict of the whole model (the warm start's) for an FSDP-sharded one: every
    per-parameter tensor becomes a DTensor shard laid out like its parameter (no communication)."""
    state = {**state, "state": dict(state["state"])}
    for index, per_param in state["state"].items():
        p = params[int(index)]
        state["state"][index] = {
            key: distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(value, Tensor) and value.shape == p.shape
            else value
            for key, value in per_param.items()
        }
    return state


class GroupSlice:
    """A rank's share of its group's batches: rows ``[i·b, (i+1)·b)`` of each group batch of the
    worker's stream (``index`` = position in the group, ``b`` = ``batch_size``)."""

    def __init__(self, stream: TokenStream, index: int, size: int) -> None:
        if stream.batch_size % size:
            raise ValueError(f"a group batch of {stream.batch_size} rows cannot be split over {size} ranks")
        self.stream = stream
        self.rows = stream.batch_size // size
        self.index = index

    @property
    def tokens_per_batch(self) -> int:
        """The group's tokens per step (what the budget counts)."""
        return self.stream.tokens_per_batch

    def next_batch(self) -> Tensor:
        batch = self.stream.next_batch()
        return batch[self.index * self.rows : (self.index + 1) * self.rows]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


_ERRORS: dict[str, type[Exception]] = {
    "ServerStopped": ServerStopped,
    "QuorumUnreachable": QuorumUnreachable,
    "TransportError": TransportError,
    "TimeoutError": TimeoutError,
    "ValueError": ValueError,
}


class GroupTransport:
    """A group's end of the connection. On the group's first rank it forwards to ``inner`` (the
    worker's real transport) and broadcasts each answer to the group: a small header (version,
    statistics, or the error the server raised) and the parameters as one flat buffer. On the other
    ranks ``dispatch``/``submit`` wait for that broadcast, so every rank's ``DiLoCoWorker.sync()``
    returns the same ``Update`` (or raises the same error) at the same point of the round.

    With an ``encoder`` (the leader's: ``uplink_codec``, in an ``ErrorFeedback`` with error
    feedback) the leader encodes the group's Δ and sends it with ``submit_encoded``, so the group
    keeps one error-feedback residual, on the rank that talks to the server; ``uplink_nbytes`` (the
    message's size, relayed to every rank) is what the round put on the wire. ``inner`` may be an
    ``EmulatedLink`` around the leader's transport (``link``): the leader sleeps for the bytes, the
    others wait for its broadcast. With ``downlink: delta`` the leader's transport keeps the held
    copy and rebuilds the full parameters, which the group gets as always; ``reply_nbytes`` relays
    the size the reply had on the wire, so every rank counts the encoded change."""

    def __init__(
        self,
        inner: Any,
        group: Any,
        leader: int,
        is_leader: bool,
        params_like: list[Tensor],
        encoder: Any = None,
    ) -> None:
        if encoder is not None and not is_leader:
            raise ValueError("only the group's leader encodes Δ; give the other ranks encoder=None")
        self.inner = inner
        self.encoder = encoder
        self.uplink_nbytes: int | None = None  # the last submission's encoded size (None: plain Δ)
        self.last_reply_nbytes: int | None = None  # the last reply's size on the leader's wire
        self.group = group
        self.leader = leader
        self.is_leader = is_leader
        self.like = params_like
        self.sharded = isinstance(params_like[0], DTensor)  # FSDP: every rank holds a shard
        self.shapes = [p.shape for p in params_like]  # a DTensor's shape is the full one
        device = params_like[0].device
        self.flat = torch.empty(sum(p.numel() for p in params_like), dtype=torch.float32, device=device)
        self.views = [
            v.view(s)
            for v, s in zip(self.flat.split([p.numel() for p in params_like]), self.shapes, strict=True)
        ]

    def dispatch(self, worker_id: int) -> Update:
        self.uplink_nbytes = None
        return self.relay(worker_id, lambda: self.inner.dispatch(worker_id))

    def submit(self, worker_id: int, pseudo_grads: Any, base_version: int) -> Update:
        return self.relay(worker_id, self.prepare_submit(worker_id, pseudo_grads, base_version))

    def prepare_submit(
        self, worker_id: int, pseudo_grads: Any, base_version: int
    ) -> Callable[[], Update] | None:
        """The part of a submission done at the round's end on every rank's own thread: under FSDP
        the group's gather of the full Δ (a collective), and on the leader the encoding (which moves
        the error-feedback residual on). Returns the leader's server call, which touches no
        collective of the group (None on the other ranks): ``submit`` runs it at once, an overlapped
        group (``GroupExchange``) on a background thread."""
        if self.sharded:  # FSDP: the group gathers the full Δ on every rank (one collective each)
            pseudo_grads = [d.full_tensor() for d in pseudo_grads]
        if not self.is_leader:  # its Δ equals the leader's (DDP) or was gathered by it (FSDP)
            return None
        self.uplink_nbytes = None  # set by an encoded submission
        if self.encoder is None:
            return lambda: self.inner.submit(worker_id, pseudo_grads, base_version)
        try:
            message = self.encode(pseudo_grads)
        except Exception as refused:  # raised by the call, so that the relay tells the whole group
            error = refused

            def refuse() -> Update:
                raise error

            return refuse
        return lambda: self.inner.submit_encoded(worker_id, message, base_version)

    def encode(self, deltas: Any) -> Any:
        """The leader's message: Δ on the CPU (where codecs work), encoded into the inner
        transport's send buffer when it offers one, as ``DiLoCoWorker.outgoing`` does."""
        deltas = [d.detach().to("cpu") for d in deltas]
        wire = getattr(self.inner, "encoded_buffer", None)
        message = self.encoder.encode(deltas, out=wire()) if callable(wire) else self.encoder.encode(deltas)
        self.uplink_nbytes = int(message.nbytes)
        return message

    @property
    def link(self) -> Any:
        """The leader's transport as the worker talks to it (an ``EmulatedLink`` when the config sets
        one); None on the other ranks, which send nothing."""
        return self.inner if self.is_leader else None

    def reply_nbytes(self, worker_id: int | None = None) -> int:
        """Bytes of the last reply's payload on the leader's wire (relayed to every rank); the fp32
        parameters when the leader's transport does not measure it."""
        if self.last_reply_nbytes is None:
            return self.flat.numel() * self.flat.element_size()
        return self.last_reply_nbytes

    def leave(self, worker_id: int | None = None) -> None:
        if self.is_leader:
            self.inner.leave(worker_id) if worker_id is not None else self.inner.leave()

    def relay(self, worker_id: int, call: Callable[[], Update] | None) -> Update:
        """The leader's ``call`` (the server call, or waiting for it), its answer or error broadcast
        to the group; every rank returns the same ``Update`` or raises the same error (an error of a
        kind not in ``_ERRORS`` as ``TransportError`` on the other ranks, the original on the leader)."""
        header: list[Any] = [None]
        update = None
        if self.is_leader:
            try:
                update = call()
                measured = getattr(self.inner, "reply_nbytes", None)
                sizes = {
                    "uplink_nbytes": self.uplink_nbytes,
                    "reply_nbytes": int(measured(worker_id)) if callable(measured) else None,
                }
                header[0] = ("ok", {**self.describe(update), **sizes})
            except Exception as e:  # any error reaches the group (others as TransportError), or it would hang
                header[0] = (
                    "error",
                    type(e).__name__ if type(e).__name__ in _ERRORS else "TransportError",
                    str(e),
                )
                dist.broadcast_object_list(header, src=self.leader, group=self.group)
                raise
        dist.broadcast_object_list(header, src=self.leader, group=self.group)
        kind, *rest = header[0]
        if kind == "error":
            raise _ERRORS[rest[0]](rest[1])
        meta = rest[0]
        self.uplink_nbytes, self.last_reply_nbytes = meta["uplink_nbytes"], meta["reply_nbytes"]
        if meta["has_params"]:
            if self.is_leader:
                torch._foreach_copy_(
                    self.views, [t.reshape(s) for t, s in zip(update.params, self.shapes, strict=True)]
                )
            dist.broadcast(self.flat, src=self.leader, group=self.group)
        params = None
        if meta["has_params"]:
            params = list(self.views)
            if self.sharded:  # each rank keeps its shard of the answer (no communication)
                params = [
                    distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                    for v, p in zip(params, self.like, strict=True)
                ]
        if self.is_leader and not self.sharded:
            return update
        return Update(params=params, **meta["fields"])

    @staticmethod
    def describe(update: Update) -> dict[str, Any]:
        fields = {
            "version": update.version,
            "staleness": update.staleness,
            "applied": update.applied,
            "dropped": update.dropped,
            "weight": update.weight,
            "released": list(update.released),
            "stats": dict(update.stats),
        }
        return {"has_params": update.params is not None, "fields": fields}
