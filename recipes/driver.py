"""The server side of a run, written once for both modes.

    admit(now)        evaluations due before ``now``; refuse an arrival past the time budget
    arrived(...)      count its tokens → metrics record → evaluation every ``eval_every`` updates →
                      checkpoint every ``save_every`` arrivals → is the run over?
    summary(...)      summary.json, with the same keys in both modes

A mode supplies only its clock (the ``now`` it passes: virtual seconds in the simulator, real seconds
since the start in distributed mode) and the ``RunServices`` that evaluate and checkpoint: in line
in the simulator, on rank 0's background thread in distributed mode (``recipes.distributed.run``). The
``RunSchedule`` counts and decides; the driver is where its answers are acted on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from heloco.aggregator import AsyncAggregator, Update
from recipes.config import RecipeConfig
from recipes.evaluation import RecordLog
from recipes.records import arrival_record
from recipes.schedule import RunSchedule


class RunServices(Protocol):
    """How a mode evaluates the global model and writes a checkpoint, both as of time ``at``."""

    def evaluate(self, at: float, reason: str) -> Any: ...

    def checkpoint(self, at: float) -> Any: ...


@dataclass
class InlineServices:
    """Evaluation and checkpoint run in line (the simulator): the run waits for them."""

    evaluate: Callable[[float, str], Any]
    checkpoint: Callable[[float], Any]


@dataclass
class Arrived:
    """What the driver decided at one arrival, for the mode to act on."""

    checkpoint: bool  # a checkpoint was asked for at this arrival
    interrupt: bool  # ``stop_after_arrivals`` reached (fault injection: end as if the process died)
    finished: bool  # the token budget is spent and no synchronous round is open


class RunDriver:
    """Arrival → schedule/budget → evaluation → checkpoint → metrics record, for either mode.

    Args:
        schedule: the run's ``RunSchedule`` (restored by the mode when it resumes).
        aggregator: the server's ``AsyncAggregator`` (its version and open round).
        log: where arrival records go (the metrics log).
        inner_steps: every worker's H (a round's tokens are H × ``tokens_per_step``).
        tokens_per_step: tokens of one inner step of a worker (its global batch: a group's batch is
            its size × ``batch_size``), one per worker or one for all.
        services: the mode's evaluation and checkpoint.
    """

    def __init__(
        self,
        schedule: RunSchedule,
        aggregator: AsyncAggregator,
        log: RecordLog,
        inner_steps: list[int],
        tokens_per_step: int | list[int],
        services: RunServices,
    ) -> None:
        self.schedule = schedule
        self.aggregator = aggregator
        self.log = log
        self.inner_steps = inner_steps
        if isinstance(tokens_per_step, int):
            tokens_per_step = [tokens_per_step] * len(inner_steps)
        self.tokens_per_step = list(tokens_per_step)
        self.services = services

    def evaluate_start(self) -> None:
        """The ``start`` evaluation, once per run (not again when it resumes)."""
        if not self.schedule.evaluated_start:
            self.services.evaluate(0.0, "start")
            self.schedule.evaluated_start = True

    def finished(self) -> bool:
        """The token budget is spent and no synchronous round is open (an open one completes first)."""
        return self.schedule.tokens_spent() and not self.aggregator.pending_workers

    def admit(self, now: float) -> bool:
        """Before an arrival at ``now``: evaluate at the ``eval_times`` passed meanwhile (the model
        has not changed since), then say whether it still counts (False past the time budget)."""
        for at in self.schedule.eval_times_before(now):
            self.services.evaluate(at, "time")
        return not self.schedule.past_time_budget(now)

    def arrived(self, worker: int, update: Update, now: float, **measured: Any) -> Arrived:
        """After the aggregator took worker ``worker``'s Δ at ``now``: count, log (``measured``: what
        the worker side knows, e.g. ``train_loss``, ``data_checksum``), evaluate and checkpoint when
        due."""
        schedule = self.schedule
        steps = self.inner_steps[worker]
        schedule.count_arrival(steps * self.tokens_per_step[worker])
        record = arrival_record(
            update,
            arrival=schedule.arrivals,
            time=now,
            tokens=schedule.tokens,
            worker=worker,
            inner_steps=steps,
            version=self.aggregator.version,
            **measured,
        )
        self.log.write(record, step=schedule.arrivals)
        if schedule.eval_after_update(update.applied, self.aggregator.version):
            self.services.evaluate(now, "updates")
        checkpoint = schedule.checkpoint_due()
        if checkpoint:
            self.services.checkpoint(now)
        return Arrived(checkpoint, schedule.interrupt_due(), self.finished())

    def evaluate_end(self) -> None:
        """At the end: the ``eval_times`` not reached, all of the model as it ended (``final`` is the
        mode's own call: it keeps the losses)."""
        for at in self.schedule.eval_times_before(float("inf")):
            self.services.evaluate(at, "time")

    def summary(
        self,
        config: RecipeConfig,
        *,
        time: float,
        stop_reason: str,
        final: dict[str, float] | None,
        busy: list[float | None],
        idle: list[float | None],
        elapsed: float,
        hub_pushes: Any,
        distributed: dict[str, Any] | None = None,
        evals_skipped: int = 0,
        background_error: str | None = None,
    ) -> dict[str, Any]:
        """summary.json: the same keys in both modes. ``time`` is the mode's clock at the end (virtual
        or real seconds: ``clock`` says which); ``busy``/``idle`` per worker in the simulator, per rank in distributed mode (None: never
        reported);
        ``distributed``: the processes' reports (world size, ranks, measured speeds, slowdowns, server
        connections), None in the simulator."""
        o, t = config.diloco, config.train
        fractions = [
            None if b is None or i is None else (i / (b + i) if b + i > 0 else 0.0)
            for b, i in zip(busy, idle, strict=True)
        ]
        return {
            "method": o.method,
            "mode": o.mode,
            "clock": "real" if o.mode == "distributed" else "virtual",
            "outer_lr": config.outer_lr,
            "seed": t.seed,
            "arrivals": self.schedule.arrivals,
            "outer_updates": self.aggregator.version,
            "tokens": self.schedule.tokens,
            "time": time,
            "stop_reason": stop_reason,
            "final_val_loss": final,
            "inner_steps": list(self.inner_steps),
            "busy_time": busy,
            "idle_time": idle,
            "idle_fraction": fractions,
            "workers": self.aggregator.worker_stats(),
            "evals_skipped": evals_skipped,
            "background_error": background_error,
            "elapsed_s": elapsed,
            "hub_pushes": hub_pushes,
            "distributed": distributed,
            "config": config.to_dict(),
        }
