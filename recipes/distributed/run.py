"""mode=distributed: one DiLoCo worker per process, the aggregator in a server thread on rank 0.

    accelerate launch --num_processes 4 recipes/train.py --config cfg.yaml --mode distributed \
        --num_workers 4 --worker_speeds 1 1 1 1
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --config_file accelerate_configs/cpu.yaml \
        recipes/train.py --config cfg.yaml --mode distributed --num_workers 3 --worker_speeds 1 1 1  # gloo
    python recipes/train.py --mode distributed --num_workers 1 --worker_speeds 1 ...  # no launcher

Each process is one worker with its own full replica: worker id = rank, data = shard
``worker_{rank}``, inner AdamW state of its own; or, with ``group_sizes``, worker k is a group of
consecutive ranks training one replica with DDP or FSDP2 inside (``recipes.distributed.groups``). Setup is the only collective phase: the warm
start is computed once (rank 0 fills the cache, the others load it), all ranks check they hold
identical parameters, exchange measured speeds (DyLU) and wait at one barrier. From then on nothing
uses the job's process group: rank 0 serves the aggregator over one gloo pair group per worker
(``heloco.distributed``), so a worker that dies takes down only its own connection.

Heterogeneity on equal hardware: rank r sleeps ``(slowdown_r − 1) ×`` the measured compute time after
each inner step (``slowdown_r = max(worker_speeds) / worker_speeds[r]``), before the round's Δ is sent.

Budget and stopping (the server decides): rank 0 wraps the aggregator in a ``Gate`` that counts
every arrival's tokens (``H_w × batch × seq_len``, H known to all ranks after the speed exchange) and
the real wall-clock time since the barrier. The arrival that reaches ``budget_tokens`` is applied and
its reply carries ``stats["stop"] = 1``, so that worker ends at once; an arrival after
``budget_time`` seconds, or any arrival once the budget is spent, is refused with ``ServerStopped``
(the other workers learn it at their next submission, i.e. they may compute one round for nothing).
A synchronous round that is open when the token budget is reached is completed first, as in the
simulator. Every rank then reports its busy/idle times through the job's store and exits; rank 0
stops the server, evaluates, writes the final checkpoint and ``summary.json``.

Outputs (``output_dir``): ``metrics.jsonl`` (rank 0: every arrival as the server saw it and the
evaluations, in the simulator's format; ``time`` is real seconds since the start), one
``metrics-rank{r}.jsonl`` per rank (its rounds: compute, emulated sleep, time blocked in the server
call, loss, staleness, correction statistics), ``checkpoint-<arrivals>/`` written by rank 0 in the
simulator's format (``recipes.run_state``, mode ``distributed``: ``model/`` with the global model and
tokenizer, ``aggregator.*``, ``workers.*`` with the submissions the server took from each worker and
the workers it had lost, ``run.*`` with the schedule and the metrics log's length, ``config.json``,
``manifest.json``), each rank's own state as of that submission in
``worker-states/rank{r}/submission-{s}/`` (``recipes.distributed.worker_state``), ``summary.json``.

Faults: a worker that dies (connection closed) is logged by the server; the others go on and rank 0
still writes a valid final checkpoint. A worker can be restarted into the running job
(``HELOCO_REJOIN=1``, ``recipes.distributed.rejoin``). If any rank dies, rank 0 included, every rank
restarted with ``resume_from=latest`` continues from the newest complete checkpoint
(``recipes.distributed.resume``); under ``accelerate launch --max_restarts N`` that happens by
itself. Under ``accelerate launch``/torchrun the launcher's agent stops every local rank when one
fails (SIGTERM, 30 s grace): rank 0 treats SIGTERM like Ctrl-C (stop the server, write a final
checkpoint). See docs/distributed.md.

Layout: this module is the entry point and reads top to bottom (setup and the identical-start check,
rank 0's services, the transport, the worker phase, then a worker's exit or rank 0's shutdown); the
package's other modules are listed in ``recipes/distributed/__init__.py``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

from heloco.distributed.setup import setup_transport
from heloco.simulation import dylu_steps
from heloco.transport import ServerHandle, TransportError
from recipes.common import (
    load_data,
    make_inner_optimizer,
    make_model,
    quiet_libraries,
    seed_everything,
    warm_start,
)
from recipes.config import RecipeConfig
from recipes.data import TokenStream
from recipes.distributed.checks import check_distributed_options, check_world_size, parameter_checksum
from recipes.distributed.groups import (
    GroupLayout,
    GroupSlice,
    GroupTransport,
    new_worker_groups,
    shard_like,
    wrap_for_group,
)
from recipes.distributed.logs import JsonLines
from recipes.distributed.network import emulated_link, reply_codec, wire_codec, worker_encoder
from recipes.distributed.pacing import measure_speed, slowdown_factors
from recipes.distributed.rank0 import RankZero, WorkerOutcome
from recipes.distributed.rejoin import REJOIN_ENV, rejoin_worker
from recipes.distributed.resume import choose_resume_point
from recipes.distributed.setup import REPORT_KEY, Job, Signals, end_run, make_accelerator
from recipes.distributed.store import job_store
from recipes.distributed.worker import train_worker
from recipes.distributed.worker_state import WorkerCheckpoints
from recipes.worker_round import InnerLoop

logger = logging.getLogger(__name__)


def run_distributed(config: RecipeConfig, command: str | None = None) -> dict[str, Any]:
    """One worker per process; rank 0 also serves the aggregator, evaluates and checkpoints.

    Returns rank 0's summary (also written to ``summary.json``), or this rank's report elsewhere.
    """
    check_distributed_options(config)
    if os.environ.get(REJOIN_ENV) == "1":
        return rejoin_worker(config)

    # -- setup: the only phase that uses the job's process group -------------------------------------
    job = set_up(config)
    rank0 = RankZero(config, job, command) if job.rank == 0 else None

    # -- transport: rank 0 serves its gate, every other rank connects ---------------------------------
    transport, server = connect(config, job, rank0)
    if rank0 is not None:
        rank0.server = server  # its checkpoints record which workers it has lost
    # Created before the barrier: a replacement of this rank appends to it only after the start.
    rank_log = JsonLines(
        Path(config.train.output_dir) / f"metrics-rank{job.rank}.jsonl", fresh=job.resume is None
    )
    job.accelerator.wait_for_everyone()  # all connected: the rounds start together
    start = time.monotonic()
    signals = Signals()
    if rank0 is not None:
        rank0.start(start, signals)

    # -- the worker (every rank, rank 0 included unless it only serves) --------------------------------
    if job.worker is None:
        outcome = serve_until_done(rank0, server)
    else:
        outcome = run_worker(config, job, transport, rank_log, start, rank0)
    if rank0 is None:
        return leave(job, transport, outcome.report, rank_log)

    # -- rank 0: stop, final evaluation and checkpoint, summary ---------------------------------------
    return finish(rank0, outcome, transport, server, rank_log, signals, start)


# ---------------------------------------------------------------------------------------------------
# setup


def set_up(config: RecipeConfig) -> Job:
    """Accelerator and process group, data, model and warm start, then the identical-start check and
    the round lengths: every rank leaves with the same parameters and knows every worker's H."""
    o, t = config.diloco, config.train
    output_dir = Path(t.output_dir)
    if (output_dir / "summary.json").exists():
        raise FileExistsError(f"{output_dir} already holds a finished run; pick another output_dir")
    accelerator = make_accelerator(config, output_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    check_world_size(accelerator.num_processes, o.num_workers, launched, o.group_sizes, o.server_process)
    if not dist.is_initialized():  # one process, no launcher: the transport still needs a group and a store
        timeout = datetime.timedelta(seconds=o.comm_timeout_s)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not t.progress:
        quiet_libraries()
    seed_everything(t.seed)

    with accelerator.main_process_first():  # rank 0 builds the sample shards if asked
        shards, validation, metadata = load_data(config)
    model = make_model(config, metadata).to(accelerator.device)
    # Rank 0 fills the warm-start cache first; then one rank per other node (a cache dir that is not
    # shared); then everyone else loads it.
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        warm_state = warm_start(config, model, shards, metadata, accelerator)

    layout = None
    if o.group_sizes is not None or o.server_process:  # rank 0 alone when it only serves
        layout = GroupLayout(tuple(config.group_sizes), first_rank=int(o.server_process))
    rank, world = accelerator.process_index, accelerator.num_processes
    worker = rank if layout is None else layout.worker_of(rank)
    slowdowns = slowdown_factors(o.worker_speeds)  # per worker: every rank of a group sleeps alike
    speed = probe_speed(config, accelerator, model, shards, slowdowns, worker) if config.uses_dylu else 0.0
    measured = check_identical_start(accelerator, model, speed)
    worker_of = [r if layout is None else layout.worker_of(r) for r in range(world)]
    resume = choose_resume_point(config, accelerator, worker_of)
    group = replica = None
    if layout is not None:  # after the identical-start check: DDP/FSDP wrap the checked replica
        groups = new_worker_groups(layout, datetime.timedelta(seconds=o.comm_timeout_s))
        group = groups.get(worker)
        if group is not None:
            if o.group_parallelism == "fsdp":  # fully_shard converts the module itself: keep a whole copy
                model, replica = copy.deepcopy(model), model
            replica = wrap_for_group(replica or model, group, o.group_parallelism, accelerator.device)
    if config.uses_dylu:  # a group is as fast as its slowest rank
        per_worker = [
            min(m for m, w in zip(measured, worker_of, strict=True) if w == k) for k in range(o.num_workers)
        ]
        steps = dylu_steps(per_worker, o.inner_steps, o.dylu_power)
    else:
        steps = [o.inner_steps] * o.num_workers
    return Job(
        accelerator=accelerator,
        rank=accelerator.process_index,
        world=world,
        model=model,
        shards=shards,
        validation=validation,
        metadata=metadata,
        warm_state=warm_state,
        steps=steps,
        measured=measured,
        slowdowns=slowdowns,
        resume=resume,
        layout=layout,
        group=group,
        replica=replica,
    )


def probe_speed(
    config: RecipeConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    shards: list[torch.Tensor],
    slowdowns: list[float],
    worker: int | None,
) -> float:
    """This rank's inner steps per second (DyLU), measured one rank at a time so that ranks sharing a
    machine do not slow each other's probe."""
    rank = accelerator.process_index
    speed = 0.0
    for r in range(accelerator.num_processes):
        if r == rank and worker is not None:  # (a server process of its own has no worker)
            probe = shards[worker][: config.data.batch_size].to(accelerator.device)
            speed = measure_speed(model, probe, accelerator, slowdowns[worker])
        accelerator.wait_for_everyone()
    return speed


def check_identical_start(accelerator: Accelerator, model: torch.nn.Module, speed: float) -> list[float]:
    """One all-gather of every rank's parameter checksum and measured speed: refuse to start unless
    all ranks hold rank 0's parameters; returns the speeds by rank."""
    world = accelerator.num_processes
    mine = torch.tensor(
        [[float(parameter_checksum(model)), speed]], dtype=torch.float64, device=accelerator.device
    )
    gathered = accelerator.gather(mine).reshape(world, 2).cpu().tolist()
    checksums = [int(row[0]) for row in gathered]
    if len(set(checksums)) != 1:
        differ = [r for r, c in enumerate(checksums) if c != checksums[0]]
        raise RuntimeError(
            f"ranks {differ} start from other parameters than rank 0 (checksums {checksums}); every "
            "worker must start from the same warm start: put pretrain_cache_dir on a filesystem all "
            "nodes share, or build the cache first (recipes.common.prepare)"
        )
    return [row[1] for row in gathered]


def connect(config: RecipeConfig, job: Job, rank0: RankZero | None) -> tuple[Any, ServerHandle | None]:
    """Rank 0 serves its gate over one gloo pair group per worker; every other worker connects. In a
    worker group only the first rank connects, and the group shares its answers (``GroupTransport``)."""
    o = config.diloco
    params = list(job.trained.parameters())  # FSDP: DTensors (full shapes, local shards)
    transport, server = None, None
    leader = job.layout is None or job.layout.is_leader(job.rank)
    if leader or job.worker is None:
        transport, server = setup_transport(
            params,
            rank0.gate if rank0 is not None else None,
            server_rank=0,
            store=job_store(),  # this attempt's namespace of the job's store
            wire_dtype=getattr(torch, o.wire_dtype),
            timeout=o.comm_timeout_s,
            connect_timeout=o.comm_timeout_s,
            rejoin_timeout=o.rejoin_timeout_s,
            worker_id=job.worker,
            num_workers=job.num_workers,
            server_worker=0,
            serve_only=o.server_process,
            codec=wire_codec(config),
            downlink_codec=reply_codec(config),
        )
    if transport is not None and job.worker is not None:  # an emulated slow link, when the config sets one
        transport = emulated_link(config, transport, job.worker)
    if job.group is not None:  # the leader encodes the group's Δ (one error-feedback residual)
        encoder = worker_encoder(config) if leader else None
        transport = GroupTransport(
            transport, job.group, job.layout.leader_of(job.worker), leader, params, encoder=encoder
        )
    return transport, server


# ---------------------------------------------------------------------------------------------------
# the worker phase and the end of the run


def run_worker(
    config: RecipeConfig,
    job: Job,
    transport: Any,
    rank_log: JsonLines,
    start: float,
    rank0: RankZero | None,
) -> WorkerOutcome:
    """This rank's rounds until the server says stop. On rank 0 an interrupt or a failure of its own
    worker ends the run but is held back until the global model is saved; elsewhere it propagates."""
    d, t = config.data, config.train
    warm_state = job.warm_state
    if warm_state is not None and job.replica is not None and config.diloco.group_parallelism == "fsdp":
        warm_state = shard_like(warm_state, list(job.trained.parameters()))
    optimizer = make_inner_optimizer(config, job.trained, warm_state)
    size = config.group_sizes[job.worker]
    stream = TokenStream(job.shards[job.worker], size * d.batch_size, t.seed, stream_id=job.worker)
    if size > 1:  # this rank's slice of its group's batches
        stream = GroupSlice(stream, job.rank - job.layout.leader_of(job.worker), size)
    resumed = job.resume.worker if job.resume is not None else None
    if resumed is not None:
        resumed.restore(optimizer, stream)
    submissions = job.resume.submissions[job.worker] if job.resume is not None else 0
    checkpoints = WorkerCheckpoints.for_run(config, job.rank, submissions)
    event = {"event": "start" if job.resume is None else "resume", "rank": job.rank}
    rank_log.write({**event, "pid": os.getpid(), "host": socket.gethostname(), "submissions": submissions})
    try:
        local_step = resumed.local_step if resumed is not None else 0
        report = train_worker(
            config=config,
            rank=job.rank,
            worker_id=job.worker,
            loop=InnerLoop(config, job.trained, optimizer, stream, job.accelerator, local_step),
            transport=transport,
            steps=job.steps[job.worker],
            slowdown=job.slowdowns[job.worker],
            start=start,
            rank_log=rank_log,
            gate=rank0.gate if rank0 is not None else None,
            checkpoints=checkpoints,
            group_size=size,
            resumed=resumed,
        )
    except KeyboardInterrupt:
        if rank0 is None:
            raise
        return WorkerOutcome({"rank": 0, "reason": "interrupted"}, interrupted=True)
    except BaseException as e:
        if rank0 is None:
            raise
        logger.exception("rank 0's worker failed; stopping the run and saving the global model")
        return WorkerOutcome({"rank": 0, "reason": f"error: {e!r}"}, error=e)
    return WorkerOutcome(report)


def serve_until_done(rank0: RankZero, server: ServerHandle) -> WorkerOutcome:
    """Rank 0 as a server process of its own (``server_process``): wait until the run is over, or
    every worker is gone (then the run stops there, saving the global model)."""
    try:
        while not rank0.gate.closed.wait(0.5):
            if not any(w["alive"] for w in server.worker_stats()):
                return WorkerOutcome({"rank": 0, "reason": "workers_gone"}, interrupted=True)
    except KeyboardInterrupt:
        return WorkerOutcome({"rank": 0, "reason": "interrupted"}, interrupted=True)
    return WorkerOutcome({"rank": 0, "reason": rank0.gate.stop_reason or "stopped"})


def leave(job: Job, transport: Any, report: dict[str, Any], rank_log: JsonLines) -> dict[str, Any]:
    """A worker rank's exit: close its connection, leave its report for rank 0 in the job's store."""
    with contextlib.suppress(TransportError):
        transport.leave()  # a no-op when the server already answered STOPPED
    try:
        job_store().set(REPORT_KEY.format(rank=job.rank), json.dumps(report))
    except Exception as e:  # rank 0 (the store) is gone: nothing left to report to
        logger.warning("rank %d could not report to rank 0: %s", job.rank, e)
    rank_log.close()
    end_run(job.accelerator)
    return report


def finish(
    rank0: RankZero,
    outcome: WorkerOutcome,
    transport: Any,
    server: ServerHandle,
    rank_log: JsonLines,
    signals: Signals,
    start: float,
) -> dict[str, Any]:
    """Rank 0's end: further signals are only recorded while it shuts down and saves; its worker's
    error, if any, is raised once the final checkpoint is written."""
    signals.record()
    try:
        summary = rank0.shut_down(outcome, transport, server, signals, start)
    finally:
        rank0.close()
        rank_log.close()
        signals.restore()
        end_run(rank0.job.accelerator)
    if outcome.error is not None:
        raise outcome.error
    summary["interrupted"] = outcome.interrupted
    return summary
