"""The ``arrival`` record of the metrics log, the same in both modes (``eval`` records are written by
``recipes.evaluation.Evaluator``)."""

from __future__ import annotations

from typing import Any

from heloco.aggregator import Update


def arrival_record(
    update: Update,
    *,
    arrival: int,
    time: float,
    tokens: int,
    worker: int,
    inner_steps: int,
    version: int,
    train_loss: float | None = None,
    data_checksum: int | None = None,
) -> dict[str, Any]:
    """One submission as the server saw it: when, whose, how stale, how weighted, whether applied,
    the correction statistics; the simulator adds the round's train loss and a checksum of its data."""
    record: dict[str, Any] = {
        "event": "arrival",
        "arrival": arrival,
        "time": time,
        "tokens": tokens,
        "worker": worker,
        "inner_steps": inner_steps,
    }
    if train_loss is not None:
        record["train_loss"] = train_loss
    record.update(
        staleness=update.staleness,
        weight=update.weight,
        applied=update.applied,
        dropped=update.dropped,
        version=version,
    )
    if data_checksum is not None:
        record["data_checksum"] = data_checksum
    record.update({k: v for k, v in update.stats.items() if k not in ("staleness", "weight")})
    return record
