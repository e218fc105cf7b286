"""Distributed mode's process-level plumbing, apart from the run itself: the Accelerator with the
communication timeout, what setup leaves every rank with (``Job``), rank 0's signal handling, the
end-of-run reports ranks leave in the job's store, and the clean shutdown."""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from heloco.transport import ServerHandle
from recipes.config import RecipeConfig
from recipes.distributed.groups import GroupLayout
from recipes.distributed.resume import ResumePoint
from recipes.distributed.store import AGENT_STORE_ENV, attempt_prefix

logger = logging.getLogger(__name__)

REPORT_KEY = "heloco-run/report/{rank}"  # a rank's end-of-run report (JSON) in the job's store
START_KEY = "heloco-run/start"  # time.time() when the rounds started (for workers that rejoin)


def make_accelerator(config: RecipeConfig, output_dir: Path) -> Accelerator:
    t, o = config.train, config.diloco
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = (
        torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    )
    timeout = datetime.timedelta(seconds=o.comm_timeout_s)
    init = InitProcessGroupKwargs(timeout=timeout)
    # Accelerate passes on only the values that differ from its own defaults (600 s), which would
    # leave gloo at torch's 30 min when comm_timeout_s is 600: always pass the timeout.
    init.to_kwargs = lambda: {"timeout": timeout}
    # Several processes on a machine without GPUs: gloo on CPU (Accelerate would otherwise give
    # every process a world of its own unless ACCELERATE_USE_CPU=1 is exported).
    cpu = launched > 1 and not has_accelerator
    if launched > 1:
        init_restarted_group(timeout, "gloo" if cpu else None)
    return Accelerator(
        cpu=cpu,
        mixed_precision=config.model.mixed_precision,
        log_with=None if t.report_to == "none" else t.report_to,
        project_dir=str(output_dir),
        kwargs_handlers=[init],
    )


def init_restarted_group(timeout: datetime.timedelta, backend: str | None) -> bool:
    """After a restart by torchrun's agent, the default process group over this attempt's namespace
    of the agent's store (Accelerate then finds it initialised and keeps it); returns whether it did.

    torch's own ``env://`` initialisation would use the agent's store as it is, where the previous
    attempt's gloo addresses still lie: a rank that reads them before the relaunched peer wrote its
    own connects to a dead process (``connectFullMesh``: connection refused). See ``attempt_prefix``.
    ``backend`` None: torch's default for the devices present (gloo for CPU tensors in any case)."""
    prefix = attempt_prefix()
    if prefix is None or os.environ.get(AGENT_STORE_ENV) != str(True) or dist.is_initialized():
        return False
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(prefix, store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )
    logger.info("restart of the job: process group over the store's namespace %s", prefix)
    return True


@dataclass
class Job:
    """What setup leaves every rank with (``recipes.distributed.set_up``)."""

    accelerator: Accelerator
    rank: int
    world: int
    model: torch.nn.Module  # this rank's replica, equal on every rank after setup
    shards: list[torch.Tensor]
    validation: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    warm_state: dict[str, Any] | None  # the warm start's AdamW state
    steps: list[int]  # H of every worker
    measured: list[float]  # inner steps per second of every rank (DyLU; zeros otherwise)
    slowdowns: list[float]  # emulated slowdown of every worker
    resume: ResumePoint | None = None  # the checkpoint this run continues (None: a fresh start)
    layout: GroupLayout | None = None  # which ranks make up which worker (None: one rank each)
    group: Any = None  # this rank's worker group (None: a worker of one process)
    replica: torch.nn.Module | None = None  # what trains: ``model`` in DDP/FSDP over ``group`` (None: model)

    @property
    def trained(self) -> torch.nn.Module:
        return self.model if self.replica is None else self.replica

    @property
    def worker(self) -> int | None:
        """This rank's worker (its group's index; the rank itself without groups; None: rank 0 as a
        server process of its own)."""
        return self.rank if self.layout is None else self.layout.worker_of(self.rank)

    @property
    def num_workers(self) -> int:
        return self.world if self.layout is None else self.layout.num_workers


class Signals:
    """Rank 0 treats SIGTERM (what torchrun's agent sends every rank when one fails) like Ctrl-C; once
    shutting down, further signals are only recorded so the final checkpoint is not cut short."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def interrupt(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, handler)

    def record(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.received = signum

        for s in self._previous:
            signal.signal(s, handler)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def collect_reports(
    store: dist.Store,
    server: ServerHandle,
    world: int,
    exclude: set[int],
    timeout: float,
    signals: Signals,
    worker_of: list[int | None] | None = None,
) -> dict[int, dict[str, Any]]:
    """Remote ranks' end-of-run reports from the store; gives up on ranks whose worker died (or after
    ``timeout`` seconds, e.g. a worker still finishing a long round). ``worker_of[r]``: rank r's worker
    (default: the rank); ``exclude``: workers not waited for."""
    worker_of = list(range(world)) if worker_of is None else worker_of
    reports: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        states = server.worker_stats()
        for r in range(1, world):
            key = REPORT_KEY.format(rank=r)
            if r not in reports and store.check([key]):
                reports[r] = json.loads(store.get(key))
        waiting = [
            r
            for r in range(1, world)
            if r not in reports
            and worker_of[r] not in exclude
            and states[worker_of[r]]["state"] not in ("dead", "missing")
        ]
        if not waiting:
            return reports
        if time.monotonic() > deadline or signals.received is not None:
            logger.warning("no end-of-run report from rank(s) %s; summary.json leaves them out", waiting)
            return reports
        time.sleep(0.05)


def end_run(accelerator: Accelerator) -> None:
    """Close the trackers and the process group (Accelerate destroys the group it created, not ours)."""
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()
