"""The worker side of DiLoCo: a drop-in context manager around the user's inner optimizer.

The user's training loop does not change. A post-step hook on the inner optimizer counts steps and,
every ``sync_every`` of them, sends the pseudo-gradient Δ = θ_start − θ_now to the server and loads
the parameters it answers with. The inner optimizer's state (AdamW moments) stays on the worker and
is never reset, as in DiLoCo (arXiv 2311.08105).

Our own round loops (the simulator, a distributed rank) use the same class without the hooks: they run
the inner steps themselves and call ``sync()`` where the round ends. When the transport can write its
answer into given tensors (``InProcessTransport.writes_into_out``), the answer lands in θ_start
directly, so a round writes four model-sized tensors: Δ, the aggregator's copy of it, the answer and
the replica.

A transport that sends from its own buffers (``DistributedTransport``) may offer them with an
optional ``pseudo_grad_buffers()`` method (``heloco.transport.BufferedTransport``): Δ is then computed straight into them (one pass, which
also converts to the wire dtype) instead of into the worker's buffers and copied again when sent.

A round's end is three steps, which ``sync()`` runs back to back and a simulated network runs at
their own times (``recipes.simulator``): ``outgoing()`` (Δ, encoded if a codec is given),
``send()`` (the transport's submit) and ``receive()`` (what the reply does to the worker).

Two options, both off by default (then ``sync()`` is exactly the path above, with no copy added):

* ``codec``: Δ is encoded before it is sent (``heloco.codecs``: a ``Codec``, or an ``ErrorFeedback``
  around one, which keeps the residual Δ + e − decode(encode(Δ + e)) and adds it to the next Δ); the
  transport's ``submit_encoded`` carries the message and the server steps on its decoded fp32 values.
* ``overlap``: the worker does not wait for the reply. It starts its next round from where it
  sent, and merges the reply at the end of that round (the next round boundary)::

      θ ← θ_reply + (θ_now − θ_sent),   θ_start ← θ_reply

  so the next Δ = θ_reply − θ_merged = θ_sent − θ_now is exactly that round's progress, sent with
  the reply's version as its base. If the reply has not arrived when the round ends, the worker
  waits for it (``outgoing()`` refuses until ``receive()`` got it). Δ is computed as θ_sent − θ_now
  and θ ← θ_reply − Δ, which equals θ_reply + (θ_now − θ_sent) bit for bit (fl(c − b) = −fl(b − c)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.profiler import record_function

from heloco.outgoing import Encoder, Outgoing, copy_all, tensor_bytes, usable_send_buffers
from heloco.transport import Transport

if TYPE_CHECKING:
    from heloco.aggregator import Update


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Accelerate wraps optimizers; hooks must sit on the real torch optimizer, whose step only runs
    when gradients were really synchronised (gradient accumulation, skipped fp16 steps)."""
    # AcceleratedOptimizer is itself an Optimizer subclass that wraps the real one in `.optimizer`.
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"inner_optimizer must be a torch.optim.Optimizer (or wrap one), got {type(optimizer)}"
        )
    return optimizer


class DiLoCoWorker:
    """Turn any inner loop into a DiLoCo worker with one ``with`` line.

    Args:
        model: the worker's own replica (never wrapped in DDP across workers).
        inner_optimizer: the optimizer of the user's loop (torch or Accelerate-wrapped).
        transport: anything with ``dispatch``/``submit`` (``InProcessTransport``, the distributed one).
        worker_id: this worker's index in ``[0, num_workers)``.
        sync_every: inner steps per round (H); may be changed between rounds (DyLU).
        on_sync: optional callback receiving each ``Update`` (for logging).
        start_device: where to keep θ_start (``"cpu"`` saves accelerator memory for large models).
        codec: encode Δ before sending (an ``Encoder``: a ``heloco.codecs`` codec or ``ErrorFeedback``);
            the transport must have ``submit_encoded``. None: Δ is sent as tensors (today's path).
        overlap: start the next round at once and merge the reply at the round after (module
            docstring); keeps one more model-sized buffer (θ_sent).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: Any,
        transport: Transport,
        worker_id: int,
        sync_every: int,
        *,
        on_sync: Callable[[Update], None] | None = None,
        start_device: torch.device | str | None = None,
        codec: Encoder | None = None,
        overlap: bool = False,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {sync_every}")
        if codec is not None:
            if not isinstance(codec, Encoder):
                raise TypeError(f"codec must have an encode(tensors) method, got {type(codec).__name__}")
            if not callable(getattr(transport, "submit_encoded", None)):
                raise TypeError(
                    f"a codec needs a transport with submit_encoded(); {type(transport).__name__} has none"
                )
        self.model = model
        self.optimizer = _unwrap_optimizer(inner_optimizer)
        self.transport = transport
        self.worker_id = worker_id
        self.sync_every = int(sync_every)
        self.on_sync = on_sync
        self.params = [p for p in model.parameters()]
        device = start_device
        self._start = [
            torch.empty_like(p, device=device if device is not None else p.device) for p in self.params
        ]
        self._delta: list[torch.Tensor] | None = None  # Δ's own buffers, made on first in-process use
        self._answer_into_start = bool(getattr(transport, "writes_into_out", False))  # decided once
        self.base_version: int | None = None
        self.local_step = 0
        self.steps_since_sync = 0
        self.waiting = False
        self.last_update: Update | None = None
        self._hooks: list[Any] = []
        self.codec = codec
        self.overlap = bool(overlap)
        self._sent: list[torch.Tensor] | None = None  # overlap: θ where the current round started
        self.awaiting_reply = False  # overlap: a Δ was sent and its reply not yet received
        self.reply_held = False  # overlap: a reply sits in θ_start, merged at the next round's end
        self._held_version: int | None = None

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> DiLoCoWorker:
        self._hooks = [
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
        ]
        if self.base_version is None:
            self.pull()
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- hooks -----------------------------------------------------------------------------------
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.waiting and not self.overlap:  # overlapping, the next round goes on meanwhile
            raise RuntimeError(
                f"worker {self.worker_id} stepped while its synchronous round is pending; "
                "call worker.pull() once the round completes"
            )

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.local_step += 1
        self.steps_since_sync += 1
        if self.steps_since_sync >= self.sync_every:
            self.sync()

    # -- communication ---------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_gradient(self) -> list[torch.Tensor]:
        """Δ = θ_start − θ_now, in preallocated buffers (a descent direction).

        If the transport offers ``pseudo_grad_buffers()`` that fit (same shapes and device as the
        parameters), Δ is written there, in their dtype (the wire dtype, e.g. bf16), by one
        ``torch.sub(start, now, out=buf)`` per tensor: the values the transport would send anyway,
        without a second copy. Otherwise (in process) it goes into the worker's own buffers.
        Shows up as ``heloco.pseudo_gradient`` in a ``torch.profiler`` trace.
        """
        with record_function("heloco.pseudo_gradient"):
            return self._pseudo_gradient()

    def _pseudo_gradient(self) -> list[torch.Tensor]:
        now = [p.detach() for p in self.params]
        offered = getattr(self.transport, "pseudo_grad_buffers", None)
        if callable(offered):
            buffers = usable_send_buffers(offered(), self._start, now)
            if buffers is not None:
                for buf, start, cur in zip(buffers, self._start, now, strict=True):
                    torch.sub(start, cur, out=buf)
                return buffers
        if self._delta is None:
            self._delta = [torch.empty_like(s) for s in self._start]
        if self._delta[0].device != now[0].device:
            now = [t.to(self._delta[0].device, non_blocking=True) for t in now]
        for delta, start, cur in zip(self._delta, self._start, now, strict=True):
            torch.sub(start, cur, out=delta)  # one pass per tensor
        return self._delta

    def sync(self) -> Update:
        """End the round: submit Δ, load the answer (or wait for a pending quorum; overlapping: keep
        the answer for the next round's end). ``outgoing()``, ``send()`` and ``receive()`` in one."""
        update = self.send(self.outgoing())
        self.receive(update)
        if self.on_sync is not None:
            self.on_sync(update)
        return update

    def outgoing(self) -> Outgoing:
        """The round's message: Δ (overlapping: after merging the held reply), encoded if a codec is
        given. Δ stays in its buffers (or the message) until ``send``; call it once per round."""
        if self.base_version is None:
            raise RuntimeError(
                "worker has no base parameters yet; use it as a context manager or call pull()"
            )
        delta = self._merge_and_delta() if self.overlap else self.pseudo_gradient()
        self.steps_since_sync = 0
        if self.codec is None:
            return Outgoing(self.base_version, tensor_bytes(delta), pseudo_grads=delta)
        if any(d.device.type != "cpu" for d in delta):  # codecs work where the wire is: the CPU
            delta = [d.to("cpu") for d in delta]
        # A transport that sends from its own buffer (DistributedTransport) offers where to encode.
        wire = getattr(self.transport, "encoded_buffer", None)
        message = self.codec.encode(delta, out=wire()) if callable(wire) else self.codec.encode(delta)
        return Outgoing(self.base_version, int(message.nbytes), message=message)

    def send(self, outgoing: Outgoing) -> Update:
        """Submit the message (``transport.submit``, or ``submit_encoded`` for an encoded one); the
        answer is written into θ_start when the transport can."""
        update = self.transmit(outgoing)
        if self.overlap:
            self.awaiting_reply = True
        return update

    def mark_in_flight(self) -> None:
        """Overlapping: record that ``outgoing``'s message is on its way (``send`` does it; a caller
        running ``transmit`` on another thread calls this first, on the worker's own thread), so the
        reply or a ``pull()`` is held for the next round's end instead of loaded."""
        if not self.overlap:
            raise RuntimeError("mark_in_flight() is for overlapped rounds (DiLoCoWorker(overlap=True))")
        self.awaiting_reply = True

    def transmit(self, outgoing: Outgoing) -> Update:
        """The transport call of ``send`` and nothing else: it reads only the message (or Δ's
        buffers) and, when the transport writes its answer into given tensors, writes θ_start. So it
        may run on a background thread while the worker trains its next round (overlap), as long as
        nothing reads θ_start or uses the transport until it returned."""
        out = {"out": self._start} if self._answer_into_start else {}
        if outgoing.message is not None:
            submit_encoded = self.transport.submit_encoded  # type: ignore[attr-defined]
            update = submit_encoded(self.worker_id, outgoing.message, outgoing.base_version, **out)
        else:
            update = self.transport.submit(
                self.worker_id, outgoing.pseudo_grads, outgoing.base_version, **out
            )
        return update

    def receive(self, update: Update) -> None:
        """What an answer does: no parameters (a synchronous round still open): wait for them
        (``pull()`` later); overlapping with a Δ in flight: keep them for the next round's end;
        otherwise load them (continue from them)."""
        self.last_update = update
        if update.params is None:
            self.waiting = True
        elif self.overlap and self.awaiting_reply:
            self._hold(update.params, update.version)
        else:
            self.load(update.params, update.version)

    def pull(self) -> Update:
        """Fetch the current global parameters (start, rejoin, or after a pending quorum completes;
        overlapping, they are the reply to the Δ in flight and are held until the round ends)."""
        if self._answer_into_start:
            update = self.transport.dispatch(self.worker_id, out=self._start)
        else:
            update = self.transport.dispatch(self.worker_id)
        if update.params is None:
            raise RuntimeError(f"server sent no parameters to worker {self.worker_id} on dispatch")
        if self.overlap and self.awaiting_reply:
            self._hold(update.params, update.version)
        else:
            self.load(update.params, update.version)
        return update

    # -- overlapped rounds -----------------------------------------------------------------------
    @torch.no_grad()
    def _hold(self, params: Sequence[torch.Tensor], version: int) -> None:
        """Keep the reply in θ_start (free while overlapping: Δ is taken from θ_sent) until the
        round ends."""
        if len(params) != len(self.params):
            raise ValueError(f"server sent {len(params)} tensors, the model has {len(self.params)}")
        if any(a is not b for a, b in zip(params, self._start, strict=True)):
            copy_all(self._start, list(params))
        self._held_version = int(version)
        self.reply_held = True
        self.awaiting_reply = False
        self.waiting = False

    @torch.no_grad()
    def _merge_and_delta(self) -> list[torch.Tensor]:
        """Overlapping: Δ = θ_sent − θ_now (this round's progress); with a held reply, θ ← θ_reply − Δ
        and the reply's version becomes the base; then θ_sent ← θ (where the next round starts)."""
        if self.awaiting_reply:
            raise RuntimeError(
                f"worker {self.worker_id}: the reply to its previous round has not arrived; "
                "receive() it before the next round's end"
            )
        now = [p.detach() for p in self.params]
        if self._sent is None:  # the first round started from θ_start
            self._sent = [torch.empty_like(s) for s in self._start]
            copy_all(self._sent, self._start)
        if self._delta is None:
            self._delta = [torch.empty_like(s) for s in self._start]
        with record_function("heloco.pseudo_gradient"):
            for delta, sent, cur in zip(self._delta, self._sent, now, strict=True):
                torch.sub(sent, cur.to(sent.device), out=delta)
        if self.reply_held:
            with record_function("heloco.merge"):
                for cur, reply, delta in zip(now, self._start, self._delta, strict=True):
                    if cur.device == reply.device and cur.dtype == reply.dtype:
                        torch.sub(reply, delta, out=cur)
                    else:
                        cur.copy_(torch.sub(reply, delta))
            self.base_version = self._held_version
            self.reply_held = False
            self._held_version = None
        copy_all(self._sent, [t.to(self._sent[0].device) for t in now])
        return self._delta

    @torch.no_grad()
    def load(self, params: list[torch.Tensor], version: int) -> None:
        """Load global parameters into the replica and remember them as the round's start point
        (``heloco.load`` in a ``torch.profiler`` trace)."""
        if len(params) != len(self.params):
            raise ValueError(f"server sent {len(params)} tensors, the model has {len(self.params)}")
        with record_function("heloco.load"):
            copy_all([p.data for p in self.params], list(params))
            if any(a is not b for a, b in zip(params, self._start, strict=True)):  # else: answered there
                copy_all(self._start, list(params))
            if self._sent is not None:  # overlapping: the next round starts here
                copy_all(self._sent, self._start)
        self.base_version = int(version)
        self.waiting = False
        self.awaiting_reply = False
        self.reply_held = False
        self._held_version = None

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this worker mid-round (the model and optimizer are saved by
        their owners)."""
        return {
            "worker_id": self.worker_id,
            "sync_every": self.sync_every,
            "base_version": self.base_version,
            "local_step": self.local_step,
            "steps_since_sync": self.steps_since_sync,
            "waiting": self.waiting,
            "start": [s.detach().clone() for s in self._start],
            **self._options_state(),
        }

    def _options_state(self) -> dict[str, Any]:
        """The overlap and codec state, only when those options are on (so a default worker's state
        is what it always was)."""
        state: dict[str, Any] = {}
        if self.overlap:
            state["overlap"] = {
                "awaiting_reply": self.awaiting_reply,
                "reply_held": self.reply_held,
                "held_version": self._held_version,
                "sent": None if self._sent is None else [s.detach().clone() for s in self._sent],
            }
        codec_state = getattr(self.codec, "state_dict", None)
        if callable(codec_state):
            state["codec"] = codec_state()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["worker_id"] != self.worker_id:
            raise ValueError(f"state is for worker {state['worker_id']}, this is worker {self.worker_id}")
        self.sync_every = int(state["sync_every"])
        self.base_version = state["base_version"]
        self.local_step = int(state["local_step"])
        self.steps_since_sync = int(state["steps_since_sync"])
        self.waiting = bool(state["waiting"])
        copy_all(self._start, list(state["start"]))
        if self.overlap != ("overlap" in state):
            raise ValueError(
                f"state was saved with overlap={'overlap' in state}, this worker has overlap={self.overlap}"
            )
        if self.overlap:
            saved = state["overlap"]
            self.awaiting_reply = bool(saved["awaiting_reply"])
            self.reply_held = bool(saved["reply_held"])
            self._held_version = None if saved["held_version"] is None else int(saved["held_version"])
            if saved["sent"] is None:
                self._sent = None
            else:
                if self._sent is None:
                    self._sent = [torch.empty_like(s) for s in self._start]
                copy_all(self._sent, list(saved["sent"]))
        codec_load = getattr(self.codec, "load_state_dict", None)
        if callable(codec_load) != ("codec" in state):
            raise ValueError("the worker's codec state does not match its codec (saved with another codec?)")
        if callable(codec_load):
            codec_load(state["codec"])
