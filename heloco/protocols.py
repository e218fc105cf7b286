"""What the aggregator expects of an outer optimizer, declared rather than probed.

``AsyncAggregator`` drives any ``torch.optim.Optimizer`` that reads the pseudo-gradient Δ from
``p.grad``. It decides once, when it is built, whether the optimizer is a
:class:`StalenessAwareOptimizer` (``isinstance`` against this runtime-checkable protocol, which looks
for ``step`` and ``last_stats``), and drives it accordingly on every outer step:

* staleness-aware (``HeLoCo``, ``DelayedNesterov``): ``step(staleness=τ)`` and, with one submission
  per step (quorum 1) and some weighting configured, ``step(weight=w)`` with Δ left unscaled, so the
  optimizer can apply w where it wants (HeLoCo: before its correction); its ``last_stats``, when not
  ``None``, is logged as ``Update.stats["correction/..."]``;
* any other optimizer (``torch.optim.SGD``): ``step()``, with Δ pre-scaled by its weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["OuterStats", "StalenessAwareOptimizer"]


@runtime_checkable
class OuterStats(Protocol):
    """Statistics of an outer step (``heloco.correction.CorrectionStats``), flattened for logging."""

    def as_dict(self) -> dict[str, float]:
        """Flat, JSON-able values."""
        ...


@runtime_checkable
class StalenessAwareOptimizer(Protocol):
    """An outer optimizer that takes the staleness τ and the arrival weight w of the Δ in ``p.grad``.

    ``step(closure=None, *, staleness=None, weight=None)``: ``staleness`` is τ (``None``: unknown),
    ``weight`` a scalar the update is multiplied by (``None``: 1). ``last_stats``: what the latest
    step did (``None``: nothing worth logging). Implemented by ``heloco.optim.HeLoCo`` and
    ``heloco.optim.DelayedNesterov``; any optimizer with both members is driven this way.
    """

    last_stats: OuterStats | None

    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        staleness: int | None = None,
        weight: float | None = None,
    ) -> float | None:
        """One outer step on Δ = ``p.grad``."""
        ...
