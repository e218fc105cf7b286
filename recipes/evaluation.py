"""Evaluating the global model, the same in both modes: the master parameters are copied into one
evaluation model, scored on every language's validation sequences, and logged as one ``eval`` record
of the metrics log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from recipes.data import eval_record, evaluate_metrics


class RecordLog(Protocol):
    def write(self, record: dict[str, Any], step: int) -> None: ...


class Evaluator:
    """Scores parameters on the validation sets and logs the result.

    Args:
        model: the evaluation / export model (its parameters are overwritten at each evaluation).
        validation: per-language (N, seq_len) token tensors.
        batch_size: evaluation batch size.
        autocast: the accelerator's autocast context factory.
        log: where the ``eval`` records go (the metrics log).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        validation: dict[str, torch.Tensor],
        batch_size: int,
        autocast: Any,
        log: RecordLog,
    ) -> None:
        self.model = model
        self.validation = validation
        self.batch_size = batch_size
        self.autocast = autocast
        self.log = log
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def load(self, params: Sequence[torch.Tensor]) -> torch.nn.Module:
        """Copy ``params`` (the master parameters, or a snapshot of them) into the evaluation model."""
        torch._foreach_copy_(list(self.model.parameters()), list(params))
        return self.model

    def __call__(
        self,
        params: Sequence[torch.Tensor],
        reason: str,
        *,
        arrival: int,
        time: float,
        tokens: int,
        version: int,
    ) -> dict[str, float]:
        """Evaluate ``params`` and log the record; returns the losses per language and ``mean``."""
        self.load(params)
        losses, accuracies = evaluate_metrics(
            self.model, self.validation, self.batch_size, self.device, self.autocast
        )
        record = {
            "event": "eval",
            "reason": reason,
            "arrival": arrival,
            "time": time,
            "tokens": tokens,
            "version": version,
            **eval_record(losses, accuracies),
        }
        self.log.write(record, step=arrival)
        return losses
