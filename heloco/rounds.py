"""The aggregator's bookkeeping: versions, per-worker staleness records, the open quorum round and
the workers removed from it. No tensors: the weighted sum of an open round lives with the aggregator.

``staleness_weight`` is the weight s(τ) of a Δ with staleness τ (Liu et al. 2024, arXiv 2401.09135).
``RoundBook`` decides what a submission may do (``check_submission`` raises before anything changes)
and records what it did; ``AsyncAggregator`` holds one and its lock.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from heloco.validation import is_int

__all__ = ["WEIGHTINGS", "RoundBook", "WorkerRecord", "staleness_weight"]

WEIGHTINGS = (None, "poly", "hinge")


def staleness_weight(staleness: int, weighting: str | None, a: float = 0.5, b: float = 4) -> float:
    """Weight s(τ) of a Δ with staleness τ (Liu et al. 2024, arXiv 2401.09135).

    ``None``: 1.  ``"poly"``: (1 + τ)^(−a).  ``"hinge"``: 1 if τ ≤ b else 1 / (a(τ − b) + 1).
    """
    if weighting is None:
        return 1.0
    if weighting == "poly":
        return float((1.0 + staleness) ** (-a))
    if weighting == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"staleness_weighting must be one of {WEIGHTINGS}, got {weighting!r}")


@dataclass
class WorkerRecord:
    """What the aggregator knows about one worker."""

    base_version: int | None = None  # version of the parameters last handed to the worker
    submissions: int = 0  # every observed submission, dropped ones included
    dropped: int = 0
    staleness_sum: int = 0
    staleness_max: int | None = None
    staleness_last: int | None = None

    @property
    def staleness_mean(self) -> float:
        """τ̂: the running mean of the worker's observed staleness (0 before its first submission)."""
        return self.staleness_sum / self.submissions if self.submissions else 0.0

    def observe(self, tau: int, dropped: bool) -> None:
        self.submissions += 1
        self.dropped += int(dropped)
        self.staleness_sum += tau
        self.staleness_max = tau if self.staleness_max is None else max(self.staleness_max, tau)
        self.staleness_last = tau

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class RoundBook:
    """Version, worker records, the open round (``pending``: (worker, τ, weight) in arrival order)
    and the removed workers of an aggregator with ``num_workers`` workers and quorum ``quorum``."""

    def __init__(self, num_workers: int, quorum: int) -> None:
        self.num_workers = num_workers
        self.quorum = quorum
        self.version = 0
        self.workers = [WorkerRecord() for _ in range(num_workers)]
        self.pending: list[tuple[int, int, float]] = []
        self.removed: set[int] = set()  # workers gone for good (remove_worker); they no longer count

    # -- reading -----------------------------------------------------------------------------------
    @property
    def pending_workers(self) -> list[int]:
        return [w for w, _, _ in self.pending]

    def is_pending(self, worker_id: int) -> bool:
        return any(w == worker_id for w, _, _ in self.pending)

    def round_quorum(self) -> int:
        """Submissions that complete the open round (``quorum``, lowered once workers were removed)."""
        if not self.removed:
            return self.quorum
        live = self.num_workers - len(self.removed)
        waiting_removed = sum(1 for w, _, _ in self.pending if w in self.removed)
        return max(1, min(self.quorum, live + waiting_removed))

    def round_staleness(self, tau: int | None = None) -> int:
        """The largest τ of the open round (with ``tau``, the submission completing it)."""
        return max(([] if tau is None else [tau]) + [t for _, t, _ in self.pending])

    def worker_stats(self) -> list[dict[str, Any]]:
        pending = set(self.pending_workers)
        return [
            {
                "worker": i,
                "base_version": r.base_version,
                "submissions": r.submissions,
                "dropped": r.dropped,
                "staleness_mean": r.staleness_mean,
                "staleness_max": r.staleness_max,
                "staleness_last": r.staleness_last,
                "pending": i in pending,
            }
            for i, r in enumerate(self.workers)
        ]

    # -- validating --------------------------------------------------------------------------------
    def check_worker(self, worker_id: Any) -> None:
        if not is_int(worker_id) or not 0 <= worker_id < self.num_workers:
            raise ValueError(f"worker_id must be an int in [0, {self.num_workers}), got {worker_id!r}")

    def check_submission(self, worker_id: int, base_version: Any) -> int:
        """Raise ValueError unless ``worker_id`` may submit Δ from ``base_version`` now; return τ."""
        if worker_id in self.removed:
            raise ValueError(
                f"worker {worker_id} was removed (remove_worker); it must dispatch to rejoin before it submits"
            )
        if not is_int(base_version) or base_version < 0:
            raise ValueError(f"base_version must be an int >= 0, got {base_version!r}")
        if base_version > self.version:
            raise ValueError(
                f"base_version {base_version} is newer than the server version {self.version}; "
                "the worker must start from parameters this server dispatched"
            )
        if self.is_pending(worker_id):
            raise ValueError(
                f"worker {worker_id} already submitted to the open quorum round "
                f"(pending: {self.pending_workers}); it must wait for the round to complete"
            )
        return self.version - int(base_version)

    # -- recording ---------------------------------------------------------------------------------
    def close_round(self) -> list[int]:
        """An outer step ran: the version advances and the open round's workers are released."""
        released = self.pending_workers
        self.pending.clear()
        self.version += 1
        return released

    # -- checkpointing -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "workers": [r.as_dict() for r in self.workers],
            "pending": {
                "workers": self.pending_workers,
                "staleness": [t for _, t, _ in self.pending],
                "weights": [float(x) for _, _, x in self.pending],
            },
        }

    def parse_state(self, sd: dict[str, Any]) -> tuple[int, list[WorkerRecord], list[tuple[int, int, float]]]:
        """Validate the bookkeeping part of an aggregator ``state_dict``; changes nothing."""
        version = sd["version"]
        if not is_int(version) or version < 0:
            raise ValueError(f"state_dict['version'] must be an int >= 0, got {version!r}")
        if sd.get("num_workers", self.num_workers) != self.num_workers:
            raise ValueError(
                f"state_dict was saved with num_workers={sd['num_workers']}, this aggregator has {self.num_workers}"
            )
        workers = sd["workers"]
        if len(workers) != self.num_workers:
            raise ValueError(f"state_dict['workers'] has {len(workers)} entries, expected {self.num_workers}")
        records = [self._parse_record(i, w, version) for i, w in enumerate(workers)]
        pend = sd["pending"]
        pw, pt, px = list(pend["workers"]), list(pend["staleness"]), list(pend["weights"])
        if not len(pw) == len(pt) == len(px):
            raise ValueError("state_dict['pending'] workers, staleness and weights differ in length")
        if len(pw) >= self.quorum:
            raise ValueError(f"state_dict has {len(pw)} pending submissions, quorum is {self.quorum}")
        if len(set(pw)) != len(pw) or not all(is_int(w) and 0 <= w < self.num_workers for w in pw):
            raise ValueError(
                f"state_dict['pending']['workers']={pw} must be distinct ids in [0, {self.num_workers})"
            )
        pending = [(int(w), int(t), float(x)) for w, t, x in zip(pw, pt, px, strict=True)]
        return int(version), records, pending

    @staticmethod
    def _parse_record(i: int, w: Any, version: int) -> WorkerRecord:
        names = {f.name for f in fields(WorkerRecord)}
        if not isinstance(w, dict) or set(w) != names:
            raise ValueError(f"state_dict['workers'][{i}] must be a dict with keys {sorted(names)}")
        r = WorkerRecord(**w)
        if r.base_version is not None and not 0 <= r.base_version <= version:
            raise ValueError(
                f"state_dict['workers'][{i}]['base_version']={r.base_version} is outside [0, {version}]"
            )
        return r

    def restore(
        self, version: int, records: list[WorkerRecord], pending: list[tuple[int, int, float]]
    ) -> None:
        """Install what ``parse_state`` returned."""
        self.version = version
        self.workers = records
        self.removed.clear()  # liveness belongs to the running session, not to the saved state
        self.pending = pending
