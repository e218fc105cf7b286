"""Distributed mode, rank 0's server side: the ``Gate`` in front of the aggregator (budget, stopping,
metrics.jsonl, when to evaluate and checkpoint, all decided by a ``RunSchedule``) and the
``Background`` thread that evaluates and writes checkpoints off the serving path."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from heloco.transport import ServerStopped
from recipes.config import RecipeConfig
from recipes.driver import RunDriver
from recipes.schedule import RunSchedule

if TYPE_CHECKING:
    from recipes.distributed.logs import LockedLog

logger = logging.getLogger(__name__)

_MAX_PENDING_EVALS = 4  # evaluation snapshots waiting for the evaluation thread (each one model copy)


@dataclass
class Snapshot:
    """The run as it stood at one moment, for a checkpoint: taken under the gate's lock, so the
    schedule, the aggregator state and the metrics log's length agree."""

    time: float  # seconds since the start
    schedule: dict[str, Any]  # RunSchedule.state_dict()
    aggregator: dict[str, Any]  # AsyncAggregator.state_dict()
    metrics_lines: int  # records written when it was taken (queued evaluations not yet among them)
    submissions: list[int]  # per worker, taken by the server: whose state (worker_state) goes with it
    stop_reason: str | None = None  # the final snapshot's

    @property
    def version(self) -> int:
        return int(self.aggregator["version"])

    def eval_info(self) -> dict[str, Any]:
        """Where an evaluation of this snapshot's model stands in the run (an ``eval`` record's keys)."""
        return {
            "arrival": self.schedule["arrivals"],
            "time": self.time,
            "tokens": self.schedule["tokens"],
            "version": self.version,
        }


class Gate:
    """What the ``DistributedServer`` serves on rank 0: the aggregator behind the run's driver.

    Every submission passes here (from the server threads, and rank 0's worker in process), one at a
    time, under one lock, through the same ``RunDriver`` as the simulator's arrivals: refused once the
    budget is spent, counted (tokens = H_w × batch × seq_len), logged to metrics.jsonl, and
    evaluations and checkpoints scheduled from consistent snapshots taken here; the work itself runs
    in the ``Background`` thread. What is the gate's own: the real clock (seconds since ``start``),
    closing the run, and which worker states a checkpoint needs.
    """

    def __init__(
        self,
        aggregator: Any,
        config: RecipeConfig,
        steps: list[int],
        tokens_per_step: int,
        log: LockedLog,
        background: Background,
    ) -> None:
        self.aggregator = aggregator
        self.num_workers = aggregator.num_workers
        self.quorum = aggregator.quorum
        self.steps = steps
        self.tokens_per_step = tokens_per_step
        self.schedule = RunSchedule(config.train)
        self.driver = RunDriver(self.schedule, aggregator, log, steps, tokens_per_step, services=self)
        self.log = log
        self.background = background
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.stop_reason: str | None = None
        self.close_time: float | None = None
        self.evals_skipped = 0
        self.submissions = [0] * aggregator.num_workers  # taken by the server, per worker
        self.state_requests: dict[int, int] = {}  # worker → its submission a checkpoint still needs
        self.requested = [0] * aggregator.num_workers  # the latest submission asked of each worker
        self.started: float | None = None  # time.monotonic() at the start of the rounds
        self.resumed_at = 0.0  # seconds the run had lasted before this process (resumed runs)
        self.resumed = False

    # -- the schedule's counts, read by the worker loop, the summary and tests -------------------------
    @property
    def arrivals(self) -> int:
        return self.schedule.arrivals

    @property
    def tokens(self) -> int:
        return self.schedule.tokens

    # -- clock and state ---------------------------------------------------------------------------
    def start(self, start: float) -> None:
        self.started = start - self.resumed_at
        with self.lock:
            self.driver.evaluate_start()

    def restore(self, schedule: dict[str, Any], submissions: list[int], elapsed: float) -> None:
        """Continue a checkpointed run: its counts and pending evaluations, the submissions taken
        from each worker, and its clock (``elapsed`` seconds had passed)."""
        self.schedule.load_state_dict(schedule)
        self.submissions = [int(s) for s in submissions]
        self.requested = list(self.submissions)  # those states exist: the checkpoint was complete
        self.resumed_at = elapsed
        self.resumed = True

    def now(self) -> float:
        assert self.started is not None, "the gate was not started"
        return time.monotonic() - self.started

    def close(self, reason: str) -> None:
        """End the run (budget, interrupt, error): every later submission is refused."""
        with self.lock:
            self._close(reason)

    def _close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.stop_reason = reason
            self.close_time = self.now()
            self.closed.set()

    def final_snapshot(self) -> Snapshot:
        """The run as it ended (after ``close``): the last checkpoint's state."""
        with self.lock:
            assert self.close_time is not None, "the gate was not closed"
            return self._snapshot(self.close_time, self.stop_reason)

    # -- the aggregator's interface ------------------------------------------------------------------
    def dispatch(self, worker_id: int, *, out: Any = None) -> Any:
        update = self.aggregator.dispatch(worker_id, out=out)  # out: the server's reply buffer, no copy
        # A (re)joining worker learns its round length, the run's progress and how many of its
        # submissions the server took (its checkpoint count) from its first reply.
        update.stats = {
            **update.stats,
            "inner_steps": float(self.steps[worker_id]),
            "tokens": float(self.tokens),
            "submissions": float(self.submissions[worker_id]),
        }
        return update

    @property
    def effective_quorum(self) -> int:
        return self.aggregator.effective_quorum

    def remove_worker(self, worker_id: int) -> Any:
        """A dead worker leaves a synchronous run's quorum, so the others go on (the server calls this)."""
        with self.lock:
            return self.aggregator.remove_worker(worker_id)

    def submit(self, worker_id: int, pseudo_grads: Any, base_version: int, *, out: Any = None) -> Any:
        """The aggregator's ``submit`` behind the run's driver (``recipes.driver``, as in the
        simulator): refused once the run is over, counted, logged, evaluated and checkpointed when
        due; the reply's statistics carry the run's tokens, the worker states a checkpoint needs and
        ``stop`` when this arrival ended the run."""
        with self.lock:
            if self.closed.is_set():
                raise ServerStopped(f"the run is over ({self.stop_reason}); no more rounds")
            now = self.now()
            if not self.driver.admit(now):
                self._close("budget_time")  # arrivals after the deadline do not count (as simulated)
                raise ServerStopped(f"the time budget of {self.schedule.budget_time} s is spent")
            update = self.aggregator.submit(worker_id, pseudo_grads, base_version, out=out)
            self.submissions[worker_id] += 1
            requests = self._state_requests(worker_id)
            arrived = self.driver.arrived(worker_id, update, now)
            if arrived.checkpoint:
                requests |= self._request_states(worker_id)
            if arrived.interrupt and not self.resumed:  # fault injection: rank 0 crashes once
                logger.error("stop_after_arrivals=%d: rank 0 kills itself", self.schedule.stop_after_arrivals)
                os.kill(os.getpid(), signal.SIGKILL)
            if arrived.finished:
                self._close("budget_tokens")
            update.stats = {**update.stats, **requests, "tokens": float(self.schedule.tokens)}
            if self.closed.is_set():
                update.stats["stop"] = 1.0
            return update

    # -- the driver's services: evaluations and checkpoints go to the background thread ---------------
    def evaluate(self, at: float, reason: str) -> None:
        self._eval(at, reason)

    def checkpoint(self, at: float) -> None:
        self.background.put_checkpoint(self._snapshot(at))

    def _state_requests(self, worker_id: int) -> dict[str, float]:
        """A checkpoint taken while this worker computed its round needs its state as of its
        previous submission (it holds it until now)."""
        wanted = self.state_requests.pop(worker_id, None)
        return {} if wanted is None else {"checkpoint_previous": float(wanted)}

    def _request_states(self, worker_id: int) -> dict[str, float]:
        """A checkpoint at this arrival: the submitter writes its state now, every other worker that
        has submitted writes its state as of its latest submission when it next submits."""
        for other, count in enumerate(self.submissions):
            if other != worker_id and 0 < count != self.requested[other]:  # (not written already)
                self.state_requests[other] = self.requested[other] = count
        self.requested[worker_id] = self.submissions[worker_id]
        return {"checkpoint_submission": float(self.submissions[worker_id])}

    # -- snapshots for the background thread (taken under the lock) -----------------------------------
    def _snapshot(self, at: float, stop_reason: str | None = None) -> Snapshot:
        return Snapshot(
            time=at,
            schedule=self.schedule.state_dict(),
            aggregator=self.aggregator.state_dict(),
            metrics_lines=self.log.lines,
            submissions=list(self.submissions),
            stop_reason=stop_reason,
        )

    def _eval(self, at: float, reason: str) -> None:
        if self.background.pending_evals >= _MAX_PENDING_EVALS:
            self.evals_skipped += 1
            if self.evals_skipped == 1:
                logger.warning("evaluation falls behind training; skipping evaluations (see summary.json)")
            return
        params, version = self.aggregator.snapshot()
        info = {
            "arrival": self.schedule.arrivals,
            "time": at,
            "tokens": self.schedule.tokens,
            "version": version,
        }
        self.background.put_eval(reason, info, params)


class Background(threading.Thread):
    """Rank 0's evaluations and periodic checkpoints, off the serving path: training never waits
    for them. Jobs run in order; ``finish(cancel=True)`` drops those not started yet."""

    def __init__(
        self,
        run_eval: Callable[[str, dict[str, Any], list[torch.Tensor]], Any],
        run_checkpoint: Callable[[Snapshot], Any],
    ) -> None:
        super().__init__(name="heloco-eval", daemon=True)
        self.run_eval = run_eval
        self.run_checkpoint = run_checkpoint
        self.jobs: queue.Queue = queue.Queue()
        self.pending_evals = 0
        self.error: BaseException | None = None
        self._cancel = False

    def put_eval(self, reason: str, info: dict[str, Any], params: list[torch.Tensor]) -> None:
        self.pending_evals += 1
        self.jobs.put(("eval", reason, info, params))

    def put_checkpoint(self, snapshot: Snapshot) -> None:
        self.jobs.put(("checkpoint", None, None, snapshot))

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            kind, reason, info, payload = job
            if kind == "eval":
                self.pending_evals -= 1
            if self._cancel:
                continue
            try:
                if kind == "eval":
                    self.run_eval(reason, info, payload)
                else:
                    self.run_checkpoint(payload)
            except Exception as e:  # the first failure goes to summary.json; training goes on
                logger.exception("rank 0's %s job failed", kind)
                self.error = self.error or e

    def finish(self, cancel: bool = False) -> None:
        self._cancel = cancel
        self.jobs.put(None)
        self.join()
