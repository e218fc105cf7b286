"""Distributed mode, the worker side every rank runs: the round loop (``train_worker``) and the
``_RoundTimer`` that measures compute, emulated sleep and time blocked in the server call."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from heloco import DiLoCoWorker
from heloco.transport import QuorumUnreachable, ServerStopped
from recipes.common import begin_round, inner_step, set_inner_lr
from recipes.config import RecipeConfig
from recipes.data import TokenStream
from recipes.distributed_utils import emulate_slowdown, synchronize
from recipes.schedule import budget_progress

if TYPE_CHECKING:
    from recipes.distributed_server import Gate
    from recipes.distributed_utils import JsonLines
    from recipes.worker_state import WorkerCheckpoints

logger = logging.getLogger(__name__)


class _RoundTimer:
    """Per-step compute time, emulated slowdown and time blocked in the server call, via two post-step
    hooks on the inner optimizer around DiLoCoWorker's own (hooks run in registration order)."""

    def __init__(self, slowdown: float, device: torch.device) -> None:
        self.slowdown = slowdown
        self.device = device
        self.compute = self.sleep = self.idle = 0.0
        self.round = {"compute_s": 0.0, "sleep_s": 0.0, "idle_s": 0.0}
        self._step_start = 0.0
        self._sync_start = 0.0

    def begin_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self, *_: Any) -> None:  # registered before the worker's hook: runs before a submit
        synchronize(self.device)
        compute = time.perf_counter() - self._step_start
        slept = emulate_slowdown(compute, self.slowdown)
        self.compute += compute
        self.sleep += slept
        self.round["compute_s"] += compute
        self.round["sleep_s"] += slept
        self._sync_start = time.perf_counter()

    def after_sync(self, worker: DiLoCoWorker) -> Any:  # registered after the worker's hook
        def hook(*_: Any) -> None:
            if worker.steps_since_sync == 0:  # the worker's hook just submitted and loaded the reply
                blocked = time.perf_counter() - self._sync_start
                self.idle += blocked
                self.round["idle_s"] += blocked

        return hook

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
    worker: DiLoCoWorker,
    optimizer: torch.optim.Optimizer,
    rank_log: JsonLines,
    rank: int,
    rounds: int,
    refused: ValueError,
) -> None:
    """The server refused this round's Δ (NaN or Inf, a wrong shape, a version from the future) and
    left the global model unchanged: log it, drop the round and start the next one from the current
    global parameters."""
    logger.warning("rank %d: the server refused round %d's pseudo-gradient: %s", rank, rounds + 1, refused)
    rank_log.write({"event": "refused", "rank": rank, "round": rounds + 1, "error": str(refused)})
    optimizer.zero_grad(set_to_none=True)  # the step ran; its zero_grad did not
    worker.steps_since_sync = 0
    worker.pull()


def train_worker(
    *,
    config: RecipeConfig,
    rank: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    transport: Any,
    stream: TokenStream,
    steps: int,
    slowdown: float,
    accelerator: Accelerator,
    start: float,
    rank_log: JsonLines,
    gate: Gate | None,
    checkpoints: WorkerCheckpoints,
    local_step: int = 0,
) -> dict[str, Any]:
    """Rounds of ``steps`` inner steps until the server says stop; returns this rank's report.
    After each submission ``checkpoints`` keeps this worker's state and writes what the server asks
    for; ``local_step``: the inner steps of a resumed worker so far (its learning-rate schedule)."""
    t = config.train
    device = accelerator.device
    timer = _RoundTimer(slowdown, device)
    worker = DiLoCoWorker(model, optimizer, transport, rank, steps)
    worker.local_step = local_step
    tokens_per_step = stream.tokens_per_batch
    global_tokens = 0.0
    rounds = wasted = rejected = 0
    reason = "unknown"
    before = optimizer.register_step_post_hook(timer.after_step)

    def progress() -> float:
        return budget_progress(t.budget_tokens, t.budget_time, global_tokens, time.monotonic() - start)

    try:
        entered = time.perf_counter()
        first = worker.pull()  # the global parameters, their version and the run's progress
        timer.idle += time.perf_counter() - entered
        global_tokens = first.stats.get("tokens", 0.0)
        steps = worker.sync_every = int(first.stats.get("inner_steps", steps))  # the server's count
        checkpoints.submissions = int(first.stats.get("submissions", checkpoints.submissions))
        with worker:
            after = optimizer.register_step_post_hook(timer.after_sync(worker))
            try:
                while True:
                    stop = reason_to_stop(gate, t.budget_time, start)
                    if stop is not None:
                        reason = stop
                        break
                    begin_round(config, optimizer)
                    set_inner_lr(config, optimizer, progress(), worker.local_step)
                    timer.new_round()
                    loss_sum = torch.zeros((), device=device)
                    abandoned = False
                    try:
                        for _ in range(worker.sync_every):
                            if t.lr_schedule == "worker_cosine":
                                set_inner_lr(config, optimizer, progress(), worker.local_step)
                            batch = stream.next_batch()
                            timer.begin_step()
                            # the H-th step's hook submits Δ and loads the server's answer
                            loss_sum += inner_step(
                                model, optimizer, batch.to(device), accelerator, t.grad_clip
                            )
                            if gate is not None and gate.closed.is_set() and worker.steps_since_sync:
                                abandoned = True  # rank 0 knows at once: no need to finish the round
                                break
                    except ValueError as refused:
                        if worker.steps_since_sync < worker.sync_every:
                            raise  # not the submission: a real error of the inner step
                        skip_refused_round(worker, optimizer, rank_log, rank, rounds, refused)
                        rejected += 1
                        continue
                    if abandoned:
                        wasted += 1
                        reason = gate.stop_reason or "stopped"
                        break
                    rounds += 1
                    update = worker.last_update
                    checkpoints.after_submission(worker.local_step, optimizer, stream, update.stats)
                    global_tokens = update.stats.get("tokens", global_tokens)
                    record = {
                        "event": "arrival",
                        "rank": rank,
                        "round": rounds,
                        "time": time.monotonic() - start,
                        "tokens": rounds * steps * tokens_per_step,
                        "global_tokens": global_tokens,
                        "train_loss": float(loss_sum) / worker.sync_every,
                    }
                    rank_log.write(round_record(record, worker, update, timer.round))
                    if update.stats.get("stop"):
                        reason = "budget_tokens"
                        break
            finally:
                after.remove()
    except (ServerStopped, QuorumUnreachable, TimeoutError) as e:  # the round in flight is lost
        wasted += 1
        reason = why_the_server_ended(e, gate, rank)
    finally:
        before.remove()
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
    }
    rank_log.write({"event": "end", **report})
    return report
