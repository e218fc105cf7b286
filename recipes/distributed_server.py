"""Distributed mode, rank 0's server side: the ``Gate`` in front of the aggregator (budget, stopping,
metrics.jsonl, when to evaluate and checkpoint) and the ``Background`` thread that evaluates and
writes checkpoints off the serving path."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from heloco.distributed.protocol import ServerStopped
from recipes.config import RecipeConfig

if TYPE_CHECKING:
    from recipes.distributed_utils import LockedLog

logger = logging.getLogger(__name__)

_MAX_PENDING_EVALS = 4  # evaluation snapshots waiting for the evaluation thread (each one model copy)


class Gate:
    """What the ``DistributedServer`` serves on rank 0: the aggregator plus the run's bookkeeping.

    Every submission passes here (from the server threads, and rank 0's worker in process), one at a
    time: it is refused once the budget is spent, counted (tokens = H_w × batch × seq_len), logged to
    metrics.jsonl, and schedules evaluations (every ``eval_every`` outer updates, and at the
    ``eval_times`` in seconds) and checkpoints (every ``save_every`` arrivals) from consistent
    snapshots taken here; the work itself runs in the ``Background`` thread.
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
        t = config.train
        self.aggregator = aggregator
        self.num_workers = aggregator.num_workers
        self.quorum = aggregator.quorum
        self.steps = steps
        self.tokens_per_step = tokens_per_step
        self.budget_tokens = t.budget_tokens
        self.budget_time = t.budget_time
        self.eval_every = t.eval_every
        self.save_every = t.save_every
        self.pending_eval_times = sorted(t.eval_times)
        self.log = log
        self.background = background
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.stop_reason: str | None = None
        self.close_time: float | None = None
        self.arrivals = 0
        self.tokens = 0
        self.evals_skipped = 0
        self._start: float | None = None

    # -- clock and state ---------------------------------------------------------------------------
    def start(self, start: float) -> None:
        self._start = start
        with self.lock:
            self._eval(0.0, "start")

    def now(self) -> float:
        assert self._start is not None, "the gate was not started"
        return time.monotonic() - self._start

    def close(self, reason: str) -> None:
        """End the run (budget, interrupt, error): every later submission is refused."""
        with self.lock:
            self._close(reason)

    def _close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.stop_reason = reason
            self.close_time = self.now()
            self.closed.set()

    # -- the aggregator's interface ------------------------------------------------------------------
    def dispatch(self, worker_id: int, *, out: Any = None) -> Any:
        update = self.aggregator.dispatch(worker_id, out=out)  # out: the server's reply buffer, no copy
        # A (re)joining worker learns its round length and the run's progress from its first reply.
        update.stats = {
            **update.stats,
            "inner_steps": float(self.steps[worker_id]),
            "tokens": float(self.tokens),
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
        with self.lock:
            if self.closed.is_set():
                raise ServerStopped(f"the run is over ({self.stop_reason}); no more rounds")
            now = self.now()
            while self.pending_eval_times and self.pending_eval_times[0] < now:
                self._eval(self.pending_eval_times.pop(0), "time")  # the model as it was at that time
            if self.budget_time is not None and now > self.budget_time:
                self._close("budget_time")  # arrivals after the deadline do not count (as simulated)
                raise ServerStopped(f"the time budget of {self.budget_time} s is spent")
            update = self.aggregator.submit(worker_id, pseudo_grads, base_version, out=out)
            self.arrivals += 1
            self.tokens += self.steps[worker_id] * self.tokens_per_step
            version = self.aggregator.version
            record = {
                "event": "arrival",
                "arrival": self.arrivals,
                "time": now,
                "tokens": self.tokens,
                "worker": worker_id,
                "inner_steps": self.steps[worker_id],
                "staleness": update.staleness,
                "weight": update.weight,
                "applied": update.applied,
                "dropped": update.dropped,
                "version": version,
                **{k: v for k, v in update.stats.items() if k not in ("staleness", "weight")},
            }
            self.log.write(record, step=self.arrivals)
            if update.applied and version % self.eval_every == 0:
                self._eval(now, "updates")
            if self.save_every and self.arrivals % self.save_every == 0:
                self.background.put_checkpoint(self._run_info(now), self.aggregator.state_dict())
            if (
                self.budget_tokens is not None
                and self.tokens >= self.budget_tokens
                and not self.aggregator.pending_workers  # an open synchronous round completes first
            ):
                self._close("budget_tokens")
            update.stats = {**update.stats, "tokens": float(self.tokens)}
            if self.closed.is_set():
                update.stats["stop"] = 1.0
            return update

    # -- snapshots for the background thread -------------------------------------------------------
    def _run_info(self, now: float) -> dict[str, Any]:
        return {"arrival": self.arrivals, "time": now, "tokens": self.tokens}

    def _eval(self, at: float, reason: str) -> None:
        if self.background.pending_evals >= _MAX_PENDING_EVALS:
            self.evals_skipped += 1
            if self.evals_skipped == 1:
                logger.warning("evaluation falls behind training; skipping evaluations (see summary.json)")
            return
        params, version = self.aggregator.snapshot()
        info = {**self._run_info(at), "version": version}
        self.background.put_eval(reason, info, params)


class Background(threading.Thread):
    """Rank 0's evaluations and periodic checkpoints, off the serving path: training never waits
    for them. Jobs run in order; ``finish(cancel=True)`` drops those not started yet."""

    def __init__(self, run_eval: Any, run_checkpoint: Any) -> None:
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

    def put_checkpoint(self, info: dict[str, Any], aggregator_state: dict[str, Any]) -> None:
        self.jobs.put(("checkpoint", None, info, aggregator_state))

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
                    self.run_checkpoint(info, payload)
            except Exception as e:  # the first failure goes to summary.json; training goes on
                logger.exception("rank 0's %s job failed", kind)
                self.error = self.error or e

    def finish(self, cancel: bool = False) -> None:
        self._cancel = cancel
        self.jobs.put(None)
        self.join()
