"""Distributed mode, the worker side every rank runs: the round loop (``train_worker``: the same
``InnerLoop.run`` then ``DiLoCoWorker.sync()`` as the simulator, or with ``overlap`` the exchange on
a background thread during the next round) and the ``RoundTimer`` that measures compute, emulated
sleep and time blocked in the server call (with overlap: waiting for a reply that has not arrived
by the round's end, plus the merge and the encoding)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from heloco import DiLoCoWorker
from heloco.distributed.link import EmulatedLink, reply_payload_nbytes, wire_itemsize
from heloco.distributed.overlap import BackgroundExchange
from heloco.transport import QuorumUnreachable, ServerStopped
from recipes.config import RecipeConfig
from recipes.distributed.group_exchange import GroupExchange
from recipes.distributed.groups import GroupTransport
from recipes.distributed.network import worker_encoder
from recipes.distributed.pacing import emulate_slowdown, synchronize
from recipes.schedule import budget_progress
from recipes.worker_round import InnerLoop

if TYPE_CHECKING:
    from recipes.distributed.gate import Gate
    from recipes.distributed.logs import JsonLines
    from recipes.distributed.worker_state import WorkerCheckpoints, WorkerState

logger = logging.getLogger(__name__)


class RoundTimer:
    """A rank's time, per round and in all: compute, emulated slowdown (sleep) and time blocked in
    the server call. The round loop calls ``after_step`` after each inner step and wraps ``sync()``
    in ``blocked()``; nothing is hooked into the optimizer."""

    def __init__(self, slowdown: float, device: torch.device) -> None:
        self.slowdown = slowdown
        self.device = device
        self.compute = self.sleep = self.idle = 0.0
        self.round = {"compute_s": 0.0, "sleep_s": 0.0, "idle_s": 0.0}

    def after_step(self, began: float) -> None:
        """One inner step that began at ``began`` (``time.perf_counter()``) is done: count its compute
        and sleep ``(slowdown − 1) ×`` as long."""
        synchronize(self.device)
        compute = time.perf_counter() - began
        slept = emulate_slowdown(compute, self.slowdown)
        self.compute += compute
        self.sleep += slept
        self.round["compute_s"] += compute
        self.round["sleep_s"] += slept

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Time spent waiting for the server (a submission and its reply, or a dispatch)."""
        entered = time.perf_counter()
        try:
            yield
        finally:
            waited = time.perf_counter() - entered
            self.idle += waited
            self.round["idle_s"] += waited

    def new_round(self) -> None:
        self.round = {"compute_s": 0.0, "sleep_s": 0.0, "idle_s": 0.0}


def reason_to_stop(gate: Gate | None, budget_time: float | None, start: float) -> str | None:
    """Why no further round should start, or None: rank 0 knows the run is over, or the time budget
    is spent (a round started now could not count)."""
    if gate is not None and gate.closed.is_set():
        return gate.stop_reason or "stopped"
    if budget_time is not None and time.monotonic() - start >= budget_time:
        return "budget_time"
    return None


def round_record(
    record: dict[str, Any], worker: DiLoCoWorker, update: Any, timing: dict[str, float]
) -> dict[str, Any]:
    """A round of metrics-rank{r}.jsonl: ``record`` (when, how far, the loss), then the round's
    length, what the server did with it, its timing and the server's statistics."""
    return {
        **record,
        "inner_steps": worker.sync_every,
        "staleness": update.staleness,
        "weight": update.weight,
        "applied": update.applied,
        "dropped": update.dropped,
        "version": update.version,
        **timing,
        **{k: v for k, v in update.stats.items() if k not in ("staleness", "weight", "tokens")},
    }


def why_the_server_ended(error: Exception, gate: Gate | None, rank: int) -> str:
    """The report's reason when a submission ended the worker: the run is over (stopped), a
    synchronous round can no longer complete, or it waited longer than ``comm_timeout_s``."""
    if isinstance(error, ServerStopped):
        logger.info("rank %d: %s", rank, error)
        return gate.stop_reason if gate is not None and gate.stop_reason else "server_stopped"
    logger.warning("rank %d: %s", rank, error)
    return "quorum_unreachable" if isinstance(error, QuorumUnreachable) else "quorum_timeout"


def skip_refused_round(
    worker: DiLoCoWorker, rank_log: JsonLines, rank: int, rounds: int, refused: ValueError
) -> None:
    """The server refused this round's Δ (NaN or Inf, a wrong shape, a version from the future) and
    left the global model unchanged: log it, drop the round and start the next one from the current
    global parameters."""
    logger.warning("rank %d: the server refused round %d's pseudo-gradient: %s", rank, rounds + 1, refused)
    rank_log.write({"event": "refused", "rank": rank, "round": rounds + 1, "error": str(refused)})
    worker.pull()


def train_worker(
    *,
    config: RecipeConfig,
    rank: int,
    loop: InnerLoop,
    worker_id: int | None = None,
    transport: Any,
    steps: int,
    slowdown: float,
    start: float,
    rank_log: JsonLines,
    gate: Gate | None,
    checkpoints: WorkerCheckpoints,
    group_size: int = 1,
    resumed: WorkerState | None = None,
) -> dict[str, Any]:
    """Rounds of ``steps`` inner steps until the server says stop; returns this rank's report.
    Each round is ``loop.run`` then the worker's ``outgoing``/``send``/``receive`` (= ``sync()``), as
    in the simulator; with ``overlap`` the exchange runs on a background thread during the next
    round (``heloco.distributed.overlap``) and its reply is merged at that round's end. After each
    submission ``checkpoints`` keeps this worker's state and writes what the server asks for.

    A rank alone in its worker may stop early on what it knows itself (rank 0 sees the gate close, the
    time budget runs out). The ranks of a group must stop together, or one would wait forever in a
    collective of a round the others left: they stop only on what the leader relays from the server
    to all of them (``stop`` in the statistics, or the server's error), so a round begun after the
    deadline is finished and refused, as in the simulator."""
    t, o = config.train, config.diloco
    timer = RoundTimer(slowdown, loop.accelerator.device)
    worker_id = rank if worker_id is None else worker_id  # a group's ranks share their worker's id
    grouped = isinstance(transport, GroupTransport)
    worker = DiLoCoWorker(  # explicit: pull, outgoing/send/receive
        loop.model,
        loop.optimizer,
        transport,
        worker_id,
        steps,
        codec=None if grouped else worker_encoder(config),  # a group's leader encodes in its transport
        overlap=o.overlap,
    )
    encoder = transport.encoder if grouped else worker.codec  # a group's: its leader's, else None
    checkpoints.encoder = encoder  # its error-feedback residual goes into the worker's state
    if resumed is not None:
        resumed.restore_encoder(encoder)
    exchange = None
    if o.overlap:  # a group's: only its leader's server call goes to the background thread
        exchange = GroupExchange(worker, transport) if grouped else BackgroundExchange(worker)
    in_flight: tuple[Any, int, WorkerState | None] | None = None  # overlap: the round being exchanged
    tokens_per_step = loop.stream.tokens_per_batch
    global_tokens = 0.0
    rounds = wasted = rejected = 0
    uplink_bytes = downlink_bytes = 0
    itemsize = wire_itemsize(getattr(torch, o.wire_dtype))
    reason = "unknown"

    def received(update: Any) -> int:
        """Count a reply's payload bytes (an encoded change with ``downlink: delta``)."""
        nonlocal downlink_bytes
        nbytes = reply_payload_nbytes(transport, worker_id, update, itemsize)
        downlink_bytes += nbytes
        return nbytes

    def progress() -> float:
        return budget_progress(t.budget_tokens, t.budget_time, global_tokens, time.monotonic() - start)

    alone = group_size == 1
    own_gate = gate if alone else None  # see the docstring: a group's ranks decide together
    own_budget_time = t.budget_time if alone else None

    def abandon() -> bool:  # rank 0 knows at once that the run stopped: no need to finish the round
        return own_gate is not None and own_gate.closed.is_set()

    def arrived(update: Any, result: Any, nbytes: int, state: WorkerState | None) -> bool:
        """A submission was answered: count it, keep its state, log it; whether the run is over.
        ``nbytes``: Δ's size as the worker made it; a group's leader's encoded size replaces it."""
        nonlocal rounds, global_tokens, uplink_bytes
        if grouped and transport.uplink_nbytes is not None:  # relayed with the answer
            nbytes = transport.uplink_nbytes
        rounds += 1
        uplink_bytes += nbytes
        reply_nbytes = received(update)
        checkpoints.after_submission(loop.local_step, loop.optimizer, loop.stream, update.stats, state=state)
        global_tokens = update.stats.get("tokens", global_tokens)
        record = {
            "event": "arrival",
            "rank": rank,
            "round": rounds,
            "time": time.monotonic() - start,
            "tokens": rounds * steps * tokens_per_step,
            "global_tokens": global_tokens,
            "train_loss": result.train_loss,
            "uplink_bytes": nbytes,
            "downlink_bytes": reply_nbytes,
        }
        rank_log.write(round_record(record, worker, update, timer.round))
        return bool(update.stats.get("stop"))

    try:
        with timer.blocked():
            first = worker.pull()  # the global parameters, their version and the run's progress
        received(first)
        global_tokens = first.stats.get("tokens", 0.0)
        steps = worker.sync_every = int(first.stats.get("inner_steps", steps))  # the server's count
        checkpoints.submissions = int(first.stats.get("submissions", checkpoints.submissions))
        while True:
            stop = reason_to_stop(own_gate, own_budget_time, start)
            if stop is not None:
                reason = stop
                break
            timer.new_round()
            result = loop.run(steps, progress, after_step=timer.after_step, abandon=abandon)
            if result is None:
                wasted += 1
                reason = gate.stop_reason or "stopped"
                break
            if exchange is not None and exchange.pending:  # overlap: the previous round's reply
                previous, in_flight = in_flight, None
                try:
                    with timer.blocked():
                        update = exchange.wait()
                except ValueError as refused:
                    skip_refused_round(worker, rank_log, rank, rounds, refused)  # held, merged below
                    rejected += 1
                else:
                    worker.receive(update)  # held: merged into this round's end by outgoing()
                    if arrived(update, *previous):
                        wasted += 1  # this round's steps, done while the last one was answered
                        reason = "budget_tokens"
                        break
            try:
                with timer.blocked():
                    outgoing = worker.outgoing()
                    if exchange is not None:  # the state is taken after the encoding (its residual)
                        exchange.start(outgoing)
                        in_flight = (result, outgoing.nbytes, None)
                        state = checkpoints.snapshot(loop.local_step, loop.optimizer, loop.stream)
                        in_flight = (result, outgoing.nbytes, state)
                        continue
                    update = worker.send(outgoing)
                    worker.receive(update)
            except ValueError as refused:
                skip_refused_round(worker, rank_log, rank, rounds, refused)
                rejected += 1
                continue
            if arrived(update, result, outgoing.nbytes, None):
                reason = "budget_tokens"
                break
    except (ServerStopped, QuorumUnreachable, TimeoutError) as e:  # the round in flight is lost
        wasted += 1
        reason = why_the_server_ended(e, gate, rank)
    if exchange is not None and exchange.pending:  # overlap: the last Δ's answer, before leaving
        try:
            with timer.blocked():
                update = exchange.wait()
            worker.receive(update)
            arrived(update, *in_flight)
        except (ServerStopped, QuorumUnreachable, TimeoutError, ValueError) as e:
            wasted += 1
            logger.info("rank %d: the last overlapped round was not taken: %s", rank, e)
    wall = time.monotonic() - start
    busy = timer.compute + timer.sleep
    report = {
        "rank": rank,
        "reason": reason,
        "rounds": rounds,
        "wasted_rounds": wasted,
        "rejected_rounds": rejected,
        "inner_steps": steps,
        "slowdown": slowdown,
        "busy_s": busy,
        "idle_s": timer.idle,
        "compute_s": timer.compute,
        "sleep_s": timer.sleep,
        "wall_s": wall,
        "idle_fraction": timer.idle / (busy + timer.idle) if busy + timer.idle > 0 else 0.0,
        "uplink_codec": o.uplink_codec,
        "uplink_bytes": uplink_bytes,  # Δ's bytes as sent (encoded size with a codec)
        "downlink": o.downlink,
        "downlink_bytes": downlink_bytes,  # the replies' payloads: the first pull and every arrival's
        "overlap": o.overlap,
    }
    link = transport.link if grouped else transport  # a group's leader: the link inside GroupTransport
    if isinstance(link, EmulatedLink):
        report.update(link.stats())
    rank_log.write({"event": "end", **report})
    return report
