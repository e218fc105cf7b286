"""The run's schedule, the same in both modes: what the budget is, how far along the run is, and
when to evaluate, checkpoint and stop. Time is virtual seconds in the simulator and real seconds since
the start in distributed mode."""

from __future__ import annotations

from typing import Any

from recipes.config import TrainArguments


def budget_progress(budget_tokens: int | None, budget_time: float | None, tokens: float, now: float) -> float:
    """Share of the budget spent: the larger of the tokens' and the time's share (the inner
    learning-rate schedule follows it, in both modes)."""
    parts = []
    if budget_tokens:
        parts.append(tokens / budget_tokens)
    if budget_time:
        parts.append(now / budget_time)
    return max(parts)


class RunSchedule:
    """Counts arrivals and tokens and answers the schedule's questions; checkpointed with the run."""

    def __init__(self, train: TrainArguments) -> None:
        self.budget_tokens = train.budget_tokens
        self.budget_time = train.budget_time
        self.eval_every = train.eval_every
        self.save_every = train.save_every
        self.stop_after_arrivals = train.stop_after_arrivals
        self.arrivals = 0
        self.tokens = 0
        self.pending_eval_times = sorted(train.eval_times)
        self.evaluated_start = False

    # -- progress and budget -------------------------------------------------------------------------
    def progress(self, now: float) -> float:
        """Share of the budget spent (``budget_progress``)."""
        return budget_progress(self.budget_tokens, self.budget_time, self.tokens, now)

    def past_time_budget(self, at: float) -> bool:
        return self.budget_time is not None and at > self.budget_time

    def tokens_spent(self) -> bool:
        return self.budget_tokens is not None and self.tokens >= self.budget_tokens

    # -- events ------------------------------------------------------------------------------------
    def count_arrival(self, tokens: int) -> None:
        self.arrivals += 1
        self.tokens += tokens

    def eval_times_before(self, at: float) -> list[float]:
        """The ``eval_times`` that fall before ``at``, removed from the schedule (evaluate each one
        on the model as it was then)."""
        due = [x for x in self.pending_eval_times if x < at]
        self.pending_eval_times = self.pending_eval_times[len(due) :]
        return due

    def eval_after_update(self, applied: bool, version: int) -> bool:
        """Every ``eval_every`` outer updates."""
        return applied and version % self.eval_every == 0

    def checkpoint_due(self) -> bool:
        """Every ``save_every`` arrivals (0: only the final checkpoint)."""
        return bool(self.save_every) and self.arrivals % self.save_every == 0

    def interrupt_due(self) -> bool:
        """``stop_after_arrivals`` (tests of resuming): end here as if the process had died."""
        return self.stop_after_arrivals is not None and self.arrivals >= self.stop_after_arrivals

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "arrivals": self.arrivals,
            "tokens": self.tokens,
            "pending_eval_times": list(self.pending_eval_times),
            "evaluated_start": self.evaluated_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.arrivals = int(state["arrivals"])
        self.tokens = int(state["tokens"])
        self.pending_eval_times = [float(x) for x in state["pending_eval_times"]]
        self.evaluated_start = bool(state["evaluated_start"])
