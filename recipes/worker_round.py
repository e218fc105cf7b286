"""A worker's round, written once for both modes: H inner steps on its own shard, then ``sync()``.

    loop = InnerLoop(config, model, optimizer, stream, accelerator)
    result = loop.run(steps, progress)   # H inner AdamW steps; the learning rate follows the schedule
    update = worker.sync()                # heloco.DiLoCoWorker: Δ into its buffer, submit, load the reply

The simulator runs it for the worker the virtual clock names; a distributed rank runs it in its own
loop, timing each step (``after_step``) to emulate a slower worker. Nothing is hooked into the
optimizer: the loop is the round, and ``sync()`` is called where it is seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from recipes.common import begin_round, inner_step, set_inner_lr
from recipes.config import RecipeConfig
from recipes.data import TokenStream


@dataclass
class RoundResult:
    """What a round's inner steps produced, for the metrics log."""

    steps: int
    train_loss: float  # mean of the round's inner losses
    data_checksum: int  # sum of the token ids seen: equal across methods at equal seeds


class InnerLoop:
    """One worker's model, inner optimizer and data stream, and its count of inner steps so far
    (``local_step``: the ``worker_cosine`` schedule follows it)."""

    def __init__(
        self,
        config: RecipeConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        stream: TokenStream,
        accelerator: Accelerator,
        local_step: int = 0,
    ) -> None:
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.stream = stream
        self.accelerator = accelerator
        self.local_step = local_step

    def run(
        self,
        steps: int,
        progress: Callable[[], float],
        after_step: Callable[[float], None] | None = None,
        abandon: Callable[[], bool] | None = None,
    ) -> RoundResult | None:
        """``steps`` inner steps (``reset_inner_optimizer`` starts them from a fresh optimizer).

        ``progress()``: the run's share of its budget (the ``cosine`` schedule); ``after_step(began)``
        is called after each step with its ``time.perf_counter()`` start; ``abandon()`` is asked after
        each step and ends the round without a result when true (the run stopped meanwhile).
        """
        config, optimizer, device = self.config, self.optimizer, self.accelerator.device
        per_step_lr = config.train.lr_schedule in ("worker_cosine", "worker_cosine_or_progress")
        begin_round(config, optimizer)
        set_inner_lr(config, optimizer, progress(), self.local_step)
        loss_sum = torch.zeros((), device=device)
        checksum = 0
        for _ in range(steps):
            if per_step_lr:
                set_inner_lr(config, optimizer, progress(), self.local_step)
            batch = self.stream.next_batch()
            checksum += int(batch.sum())
            began = time.perf_counter()
            loss_sum += inner_step(
                self.model, optimizer, batch.to(device), self.accelerator, config.train.grad_clip
            )
            self.local_step += 1
            if after_step is not None:
                after_step(began)
            if abandon is not None and abandon():
                return None
        return RoundResult(steps, float(loss_sum) / steps, checksum)
