"""mode=distributed: one DiLoCo worker per process, the aggregator in a server thread on rank 0.

    accelerate launch --num_processes 4 recipes/train.py --config cfg.yaml --mode distributed --num_workers 4
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --config_file accelerate_configs/cpu.yaml \
        recipes/train.py --config cfg.yaml --mode distributed --num_workers 3     # CPU processes, gloo
    python recipes/train.py --mode distributed --num_workers 1 ...                # one process, no launcher

Each process is one worker with its own full replica (never wrapped in DDP): worker id = rank, data =
shard ``worker_{rank}``, inner AdamW state of its own. Setup is the only collective phase: the warm
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
call, loss, staleness, correction statistics), ``checkpoint-<arrivals>/`` written by rank 0 only
(``model/``: global model + tokenizer, the aggregator state, ``run.json``, ``config.json``; the
workers' inner optimizer state and data position are not saved), ``summary.json``.

Faults: a worker that dies (connection closed) is logged by the server; the others go on and rank 0
still writes a valid final checkpoint. Under ``accelerate launch``/torchrun the launcher's agent stops
every local rank when one fails (SIGTERM, 30 s grace): rank 0 treats SIGTERM like Ctrl-C (stop the
server, write a final checkpoint). Rank 0 hosts the aggregator (and, outside torchrun, the job's
store): it must not die. See docs/distributed.md.

Layout: this module is the entry point (setup, the run on every rank, rank 0's shutdown and summary,
a restarted worker); ``recipes.distributed_server`` holds rank 0's gate and evaluation/checkpoint
thread, ``recipes.distributed_worker`` the worker loop every rank runs, ``recipes.distributed_utils``
the checks and small helpers.
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
from transformers import AutoTokenizer

from heloco.checkpoint import atomic_directory, prune_checkpoints, save_state
from heloco.distributed.client import setup_transport
from heloco.distributed.protocol import TransportError
from heloco.simulation import dylu_steps
from recipes.common import load_data, make_inner_optimizer, make_model, warm_start
from recipes.config import RecipeConfig
from recipes.data import TokenStream, eval_record, evaluate_metrics
from recipes.distributed_rejoin import REJOIN_ENV, rejoin_worker
from recipes.distributed_server import Background, Gate
from recipes.distributed_setup import (
    REPORT_KEY,
    START_KEY,
    Signals,
    collect_reports,
    end_run,
    make_accelerator,
)
from recipes.distributed_utils import (
    JsonLines,
    LockedLog,
    check_distributed_options,
    check_world_size,
    job_store,
    measure_speed,
    parameter_checksum,
    slowdown_factors,
)
from recipes.distributed_worker import train_worker
from recipes.methods import build_aggregator
from recipes.model import count_parameters
from recipes.tracking import MetricsLog

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# the run


def run_distributed(config: RecipeConfig, command: str | None = None) -> dict[str, Any]:
    """One worker per process; rank 0 also serves the aggregator, evaluates and checkpoints.

    Returns rank 0's summary (also written to ``summary.json``), or this rank's report elsewhere.
    """
    d, o, t = config.data, config.diloco, config.train
    check_distributed_options(config)
    if os.environ.get(REJOIN_ENV) == "1":
        return rejoin_worker(config)

    # -- setup (the only phase that uses the job's process group) ------------------------------------
    output_dir = Path(t.output_dir)
    if (output_dir / "summary.json").exists():
        raise FileExistsError(f"{output_dir} already holds a finished run; pick another output_dir")
    accelerator = make_accelerator(config, output_dir)
    check_world_size(accelerator.num_processes, o.num_workers, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world = accelerator.process_index, accelerator.num_processes
    if (
        not dist.is_initialized()
    ):  # one process, no launcher: the transport still needs a process group and a store
        timeout = datetime.timedelta(seconds=o.comm_timeout_s)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = accelerator.device
    if not t.progress:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(t.seed)

    # -- data, model, warm start ---------------------------------------------------------------------
    with accelerator.main_process_first():  # rank 0 builds the sample shards if asked
        shards, validation, metadata = load_data(config)
    seq_len = int(metadata["seq_len"])
    model = make_model(config, metadata).to(device)
    # Rank 0 fills the warm-start cache first; then one rank per other node (a cache dir that is not
    # shared); then everyone else loads it.
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        warm_state = warm_start(config, model, shards, metadata, accelerator)

    # -- identical start, measured speeds (one all-gather) --------------------------------------------
    slowdowns = slowdown_factors(o.worker_speeds)
    speed = 0.0
    if o.dylu:  # one rank at a time, so that ranks sharing a machine do not slow each other's probe
        probe = shards[rank][: d.batch_size].to(device)
        for r in range(world):
            if r == rank:
                speed = measure_speed(model, probe, accelerator, slowdowns[rank])
            accelerator.wait_for_everyone()
    mine = torch.tensor([[float(parameter_checksum(model)), speed]], dtype=torch.float64, device=device)
    gathered = accelerator.gather(mine).reshape(world, 2).cpu().tolist()
    checksums = [int(row[0]) for row in gathered]
    if len(set(checksums)) != 1:
        differ = [r for r, c in enumerate(checksums) if c != checksums[0]]
        raise RuntimeError(
            f"ranks {differ} start from other parameters than rank 0 (checksums {checksums}); every "
            "worker must start from the same warm start: put pretrain_cache_dir on a filesystem all "
            "nodes share, or build the cache first (recipes.common.prepare)"
        )
    measured = [row[1] for row in gathered]
    steps = dylu_steps(measured, o.inner_steps) if o.dylu else [o.inner_steps] * world

    # -- rank 0: aggregator behind the gate, evaluation thread --------------------------------------
    tokens_per_step = d.batch_size * seq_len
    gate: Gate | None = None
    background: Background | None = None
    log: LockedLog | None = None
    if rank == 0:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(d.data_dir) / "tokenizer"))
        global_model = copy.deepcopy(model)  # evaluation / export model
        log = LockedLog(MetricsLog(output_dir / "metrics.jsonl", accelerator))
        pusher = None
        if t.push_to_hub:
            from recipes.hub import CheckpointPusher

            pusher = CheckpointPusher(config, metadata, output_dir, command)

        def run_eval(reason: str, info: dict[str, Any], params: list[torch.Tensor]) -> dict[str, float]:
            with torch.no_grad():
                torch._foreach_copy_(list(global_model.parameters()), list(params))
            losses, accuracies = evaluate_metrics(
                global_model, validation, d.eval_batch_size or d.batch_size, device, accelerator.autocast
            )
            record = {
                "event": "eval",
                "reason": reason,
                "arrival": info["arrival"],
                "time": info["time"],
                "tokens": info["tokens"],
                "version": info["version"],
                **eval_record(losses, accuracies),
            }
            log.write(record, step=info["arrival"])
            if t.progress:
                accelerator.print(
                    f"[{reason}] version {info['version']} tokens {info['tokens']} "
                    f"time {info['time']:.1f}s val loss {losses['mean']:.4f}"
                )
            return losses

        def run_checkpoint(
            info: dict[str, Any], state: dict[str, Any], losses: dict[str, float] | None = None
        ) -> Path:
            path = output_dir / f"checkpoint-{info['arrival']}"
            with atomic_directory(path) as tmp:
                with torch.no_grad():
                    torch._foreach_copy_(list(global_model.parameters()), list(state["global_params"]))
                global_model.save_pretrained(tmp / "model")
                tokenizer.save_pretrained(tmp / "model")
                save_state(tmp, "aggregator", state)
                run_info = {"mode": "distributed", **info, "version": state["version"], "inner_steps": steps}
                (tmp / "run.json").write_text(json.dumps(run_info, indent=2))
                (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
            prune_checkpoints(output_dir, t.keep_checkpoints)
            if pusher is not None:
                losses = losses or run_eval(
                    "checkpoint", {**info, "version": state["version"]}, state["global_params"]
                )
                pusher.push_checkpoint(path, info["tokens"], state["version"], losses)
            return path

        background = Background(run_eval, run_checkpoint)
        masters = [p.detach().clone().float() for p in model.parameters()]
        gate = Gate(build_aggregator(config, masters), config, steps, tokens_per_step, log, background)

    # -- transport: rank 0 serves, every other rank connects ----------------------------------------
    transport, server = setup_transport(
        list(model.parameters()),
        gate,
        server_rank=0,
        wire_dtype=getattr(torch, o.wire_dtype),
        timeout=o.comm_timeout_s,
        connect_timeout=o.comm_timeout_s,
        rejoin_timeout=o.rejoin_timeout_s,
    )
    # Created before the barrier: a replacement of this rank appends to it only after the start.
    rank_log = JsonLines(output_dir / f"metrics-rank{rank}.jsonl", fresh=True)
    accelerator.wait_for_everyone()  # all connected: the rounds start together
    start = time.monotonic()
    signals = Signals()
    if rank == 0:
        job_store().set(START_KEY, repr(time.time()))  # for workers that rejoin later
        signals.interrupt()
        accelerator.init_trackers(output_dir.name, config={k: str(v) for k, v in config.to_dict().items()})
        background.start()
        gate.start(start)
        accelerator.print(
            f"{o.method} distributed: {world} workers, speeds={o.worker_speeds} "
            f"slowdown={[round(s, 3) for s in slowdowns]} H={steps} "
            f"model={count_parameters(model) / 1e6:.2f}M params outer_lr={config.outer_lr} "
            f"budget tokens={t.budget_tokens} time={t.budget_time}s wire={o.wire_dtype}"
        )

    # -- the worker (every rank, rank 0 included) ---------------------------------------------------
    optimizer = make_inner_optimizer(config, model)
    if warm_state is not None:
        optimizer.load_state_dict(copy.deepcopy(warm_state))
    stream = TokenStream(shards[rank], d.batch_size, t.seed, stream_id=rank)
    rank_log.write({"event": "start", "rank": rank, "pid": os.getpid(), "host": socket.gethostname()})
    interrupted = False
    error: BaseException | None = None
    try:
        report = train_worker(
            config=config,
            rank=rank,
            model=model,
            optimizer=optimizer,
            transport=transport,
            stream=stream,
            steps=steps[rank],
            slowdown=slowdowns[rank],
            accelerator=accelerator,
            start=start,
            rank_log=rank_log,
            gate=gate,
        )
    except KeyboardInterrupt:
        if rank != 0:
            raise
        interrupted = True
        report = {"rank": 0, "reason": "interrupted"}
    except BaseException as e:
        if rank != 0:
            raise
        error = e  # rank 0's own worker failed: keep the global model, then re-raise
        report = {"rank": 0, "reason": f"error: {e!r}"}
        logger.exception("rank 0's worker failed; stopping the run and saving the global model")

    if rank != 0:
        with contextlib.suppress(TransportError):
            transport.leave()  # a no-op when the server already answered STOPPED
        try:
            job_store().set(REPORT_KEY.format(rank=rank), json.dumps(report))
        except Exception as e:  # rank 0 (the store) is gone: nothing left to report to
            logger.warning("rank %d could not report to rank 0: %s", rank, e)
        rank_log.close()
        end_run(accelerator)
        return report

    # -- rank 0: stop, final evaluation and checkpoint, summary -------------------------------------
    signals.record()
    try:
        gate.close("interrupted" if interrupted else "error" if error is not None else report["reason"])
        rejoining = {w["worker"] for w in server.worker_stats() if w["state"] == "rejoining"}
        transport.leave(0)
        server.stop()
        background.finish(cancel=interrupted)
        params, version = gate.aggregator.snapshot()
        end = {"arrival": gate.arrivals, "time": gate.close_time, "tokens": gate.tokens, "version": version}
        final = None
        if not interrupted and error is None:  # after an interrupt or an error: only save the model
            for at in gate.pending_eval_times:
                run_eval("time", {**end, "time": at}, params)
            final = run_eval("final", end, params)
        path = run_checkpoint(end, gate.aggregator.state_dict(), final)
        accelerator.print(f"final checkpoint {path}")
        reports = collect_reports(
            job_store(), server, world, rejoining, 5.0 if interrupted else o.comm_timeout_s, signals
        )
        reports[0] = report
        hub_history = pusher.close() if pusher is not None else None
        ranks = [reports.get(r) for r in range(world)]
        summary = {
            "method": o.method,
            "mode": "distributed",
            "seed": t.seed,
            "world_size": world,
            "arrivals": gate.arrivals,
            "outer_updates": version,
            "tokens": gate.tokens,
            "wall_time": gate.close_time,
            "stop_reason": gate.stop_reason,
            "final_val_loss": final,
            "idle_time": [r.get("idle_s") if r else None for r in ranks],
            "busy_time": [r.get("busy_s") if r else None for r in ranks],
            "idle_fraction": [r.get("idle_fraction") if r else None for r in ranks],
            "ranks": ranks,
            "inner_steps": steps,
            "measured_speeds": measured if o.dylu else None,
            "slowdown": slowdowns,
            "workers": gate.aggregator.worker_stats(),
            "server": server.worker_stats(),
            "evals_skipped": gate.evals_skipped,
            "background_error": repr(background.error) if background.error else None,
            "elapsed_s": time.monotonic() - start,
            "hub_pushes": hub_history,
            "config": config.to_dict(),
        }
        if not interrupted and error is None:  # like the simulator: only a finished run has a summary
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            accelerator.print(f"final mean val loss {final['mean']:.4f} after {gate.tokens} tokens")
    finally:
        log.close()
        rank_log.close()
        signals.restore()
        end_run(accelerator)
    if error is not None:
        raise error
    summary["interrupted"] = interrupted
    return summary


# ---------------------------------------------------------------------------------------------------
# a restarted worker
