"""Distributed mode's checks and small helpers: configuration checks, the emulated slowdown and the
speed probe, the parameter checksum, the job's store and the per-rank / shared log files."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

from recipes.config import RecipeConfig

if TYPE_CHECKING:
    from recipes.tracking import MetricsLog


def check_world_size(world_size: int, num_workers: int, launched: int | None = None) -> None:
    """One worker per process: the number of processes must equal ``num_workers``."""
    if world_size == num_workers:
        return
    hint = ""
    if launched is not None and launched != world_size:
        hint = (
            f" The launcher started {launched} processes but Accelerate sees {world_size}: on a machine "
            "without GPUs export ACCELERATE_USE_CPU=1 (see accelerate_configs/cpu.yaml)."
        )
    raise ValueError(
        f"mode=distributed runs one worker per process, so the number of processes must equal "
        f"num_workers: {world_size} process(es) launched, num_workers={num_workers}. Launch with "
        f"`accelerate launch --num_processes {num_workers} ...`, or set num_workers={world_size} "
        f"(with {world_size} worker_speeds).{hint}"
    )


def check_distributed_options(config: RecipeConfig) -> None:
    """Options that only make sense in the simulator are refused before anything runs."""
    o = config.diloco
    if o.speed_jitter != 0.0:
        raise ValueError(
            f"speed_jitter={o.speed_jitter} is a simulate-mode option (real rounds have their own "
            "jitter); set it to 0 for mode=distributed"
        )


def slowdown_factors(speeds: list[float]) -> list[float]:
    """How many times slower than the fastest worker each rank must appear: max(speeds) / speed."""
    fastest = max(speeds)
    return [fastest / v for v in speeds]


def parameter_checksum(model: torch.nn.Module) -> int:
    """48 bits of a SHA-256 over every parameter's bytes: equal on two ranks iff (up to collisions)
    they hold bit-identical parameters; 48 bits travel exactly in a float64."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:6], "big")


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


RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun's agent: > 0 after a restart
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"  # "True": the agent hosts the job's store


def attempt_prefix() -> str | None:
    """The store namespace of this attempt of the job (None on the first one).

    torchrun's agent keeps ONE TCPStore for all the attempts of a job (``--max_restarts``): the static
    rendezvous Accelerate uses creates it once, the c10d one shares its own, and since torch 2.5 the
    ranks no longer put each attempt's keys under a prefix of their own. A relaunched group would
    then read what the previous attempt left there: gloo's peer addresses of dead processes
    (``connectFullMesh``: connection refused), and our incarnation counters and pair groups. Every
    key of an attempt > 0 lives under ``/worker/attempt_<n>/`` instead (torch's former prefix)."""
    attempt = int(os.environ.get(RESTART_ENV, "0") or 0)
    return f"/worker/attempt_{attempt}" if attempt > 0 else None


def attempt_store(store: dist.Store) -> dist.Store:
    """``store`` (the job's TCPStore) seen through this attempt's namespace (``attempt_prefix``)."""
    prefix = attempt_prefix()
    return store if prefix is None else dist.PrefixStore(prefix, store)


def job_store() -> dist.Store:
    """The job's store for this attempt (the one the transport uses as well): the TCPStore
    underneath the default group's store, within this attempt's namespace (``attempt_prefix``)."""
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return attempt_store(store)


class JsonLines:
    """A rank's own append-only JSONL file (no trackers: those belong to rank 0's metrics.jsonl)."""

    def __init__(self, path: Path, fresh: bool) -> None:
        if fresh:
            path.write_text("")
        # Append mode even for a fresh file: a restarted worker may write to it while the old one
        # still runs, and O_APPEND keeps their lines whole.
        self._file = open(path, "a")  # noqa: SIM115 - held open for the whole run

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class LockedLog:
    """``MetricsLog`` shared by the server threads and the evaluation thread."""

    def __init__(self, log: MetricsLog) -> None:
        self.log = log
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any], step: int) -> None:
        with self._lock:
            self.log.write(record, step=step)

    @property
    def lines(self) -> int:
        """Records written so far (a checkpoint's ``metrics_lines``)."""
        with self._lock:
            return self.log.lines

    def close(self) -> None:
        with self._lock:
            self.log.close()
