"""Per-worker token streams and validation batches over the shards built by data_prep.

A worker reads its own shard in a seeded order that depends only on (seed, worker, epoch): every
method sees the same data order per worker, and the position is part of the checkpoint.
"""

from __future__ import annotations

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
def evaluate(
    model: torch.nn.Module,
    validation: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
    autocast: Any,
) -> dict[str, float]:
    """Mean next-token loss per language (fixed sequences, so evals are comparable) and their mean."""
    was_training = model.training
    model.eval()
    losses: dict[str, float] = {}
    for language, sequences in validation.items():
        total, count = 0.0, 0
        for start in range(0, sequences.shape[0], batch_size):
            batch = sequences[start : start + batch_size].to(device)
            with autocast():
                loss = model(input_ids=batch, labels=batch).loss
            total += float(loss) * batch.shape[0]
            count += batch.shape[0]
        losses[language] = total / count
    losses["mean"] = sum(losses[lang] for lang in validation) / len(validation)
    model.train(was_training)
    return losses
