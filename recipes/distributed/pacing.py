"""Heterogeneity on equal hardware: how much slower each rank must appear, the sleep that makes it so,
and the speed probe that DyLU reads."""

from __future__ import annotations

import statistics
import time

import torch
from accelerate import Accelerator


def slowdown_factors(speeds: list[float]) -> list[float]:
    """How many times slower than the fastest worker each rank must appear: max(speeds) / speed."""
    fastest = max(speeds)
    return [fastest / v for v in speeds]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a step's wall-clock time is its real cost."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emulate_slowdown(compute_s: float, slowdown: float) -> float:
    """Sleep so that a step which computed for ``compute_s`` seconds lasts ``slowdown`` times as long;
    returns the seconds slept."""
    extra = (slowdown - 1.0) * compute_s
    if extra > 0:
        time.sleep(extra)
        return extra
    return 0.0


def measure_speed(
    model: torch.nn.Module,
    batch: torch.Tensor,
    accelerator: Accelerator,
    slowdown: float,
    repeats: int = 5,
) -> float:
    """Inner steps per second of this rank, emulated slowdown included: forward + backward on one
    batch, ``repeats`` times after one warm-up, gradients discarded (the model is unchanged). The
    median step time is used, so a passing hiccup on a shared machine does not decide H."""
    device = batch.device
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        with accelerator.autocast():
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        synchronize(device)
        emulate_slowdown(time.perf_counter() - start, slowdown)
        if i > 0:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return 1.0 / statistics.median(times)
