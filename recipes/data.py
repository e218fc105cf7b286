"""Per-worker token streams and validation batches over the shards built by data_prep.

A worker reads its own shard in a seeded order that depends only on (seed, worker, epoch): every
method sees the same data order per worker, and the position is part of the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


class TokenStream:
    """Endless batches of fixed-length sequences from one shard, reshuffled every epoch."""

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int, stream_id: int) -> None:
        if sequences.ndim != 2 or sequences.shape[0] == 0:
            raise ValueError(f"stream {stream_id}: expected a non-empty (sequences, seq_len) tensor")
        if sequences.shape[0] < batch_size:
            raise ValueError(
                f"stream {stream_id} has {sequences.shape[0]} sequences, fewer than batch_size={batch_size}"
            )
        self.sequences = sequences
        self.batch_size = batch_size
        self.seed = seed
        self.stream_id = stream_id
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.stream_id * 7_919 + epoch) % 2**63
        )
        return torch.randperm(self.sequences.shape[0], generator=generator)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.sequences.shape[1]

    def next_batch(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        index = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.sequences[index]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)


def to_tensor(dataset: Any) -> torch.Tensor:
    """A datasets.Dataset with an ``input_ids`` column of equal-length lists → (N, seq_len) int64."""
    column = dataset.with_format("numpy")[:]["input_ids"]
    return torch.from_numpy(np.asarray(column, dtype=np.int64))


@torch.no_grad()
def evaluate_metrics(
    model: torch.nn.Module,
    validation: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
    autocast: Any,
) -> tuple[dict[str, float], dict[str, float]]:
    """Next-token loss and token accuracy per language on fixed sequences (so evals are comparable),
    and over the pooled set ("mean"): every language contributes the same number of sequences of the
    same length, so the pooled value is the mean of the languages' values.

    Computed from the logits of the one forward pass on the device; the ``evaluate`` library is not
    used because its accuracy module is downloaded from the Hub at run time and would need every
    prediction moved to the host.
    """
    was_training = model.training
    model.eval()
    losses: dict[str, float] = {}
    accuracies: dict[str, float] = {}
    for language, sequences in validation.items():
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        count = 0
        for start in range(0, sequences.shape[0], batch_size):
            batch = sequences[start : start + batch_size].to(device)
            with autocast():
                logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            loss_sum += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            correct += (logits.argmax(dim=-1) == targets).sum()
            count += targets.numel()
        losses[language] = float(loss_sum) / count
        accuracies[language] = int(correct) / count
    losses["mean"] = sum(losses[lang] for lang in validation) / len(validation)
    accuracies["mean"] = sum(accuracies[lang] for lang in validation) / len(validation)
    model.train(was_training)
    return losses, accuracies


def evaluate(
    model: torch.nn.Module,
    validation: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
    autocast: Any,
) -> dict[str, float]:
    """Mean next-token loss per language and pooled ("mean"); see evaluate_metrics."""
    return evaluate_metrics(model, validation, batch_size, device, autocast)[0]


def eval_record(losses: dict[str, float], accuracies: dict[str, float]) -> dict[str, float]:
    """The metrics JSONL fields of one evaluation: loss and token accuracy per language and pooled,
    and the pooled perplexity exp(loss)."""
    return {
        **{f"val_loss/{k}": v for k, v in losses.items()},
        **{f"val_accuracy/{k}": v for k, v in accuracies.items()},
        "val_perplexity/mean": math.exp(min(losses["mean"], 700.0)),
    }
