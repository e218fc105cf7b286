"""Train per-worker replicas with (async) DiLoCo, Delayed Nesterov, look-ahead, MLA or HeLoCo.

    accelerate launch recipes/train.py --config recipes/configs/simulate.yaml [--key value ...]
    python recipes/train.py --config recipes/configs/simulate.yaml            # one process is enough

mode=simulate (default): K virtual workers in one process on one device (``recipes.simulator``). A
deterministic virtual clock (speeds in inner steps per virtual second) decides who arrives when; a
worker's round (H inner AdamW steps on its own shard) is computed when it arrives, from the parameters
it was dispatched. Each worker keeps its own parameters, AdamW state and data position across rounds.

mode=distributed: one worker per process (``accelerate launch --num_processes N``), the server in a
thread on rank 0; see recipes/distributed/run.py.

This file reads top to bottom: setup → data → warm start → server and workers → resume or start →
the rounds → final evaluation, checkpoint and summary.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from heloco.aggregator import AsyncAggregator
from heloco.simulation import VirtualClock, dylu_steps
from recipes.cli import removed_if_failed_early, run_cli
from recipes.common import (
    load_data,
    make_inner_optimizer,
    make_model,
    quiet_libraries,
    rng_state,
    seed_everything,
    set_rng_state,
    warm_start,
)
from recipes.config import RecipeConfig, parse_config
from recipes.data import TokenStream
from recipes.driver import InlineServices, RunDriver
from recipes.evaluation import Evaluator
from recipes.methods import build_aggregator
from recipes.model import count_parameters
from recipes.run_state import (
    RunState,
    final_checkpoint_error,
    find_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from recipes.schedule import RunSchedule
from recipes.simulator import SimulatedWorker, Simulator, network_model, server_transport, uplink_encoder
from recipes.tracking import MetricsLog, rounds_recorded
from recipes.worker_round import InnerLoop

logger = logging.getLogger(__name__)


def run(config: RecipeConfig, command: str | None = None) -> dict[str, Any]:
    """Run one training job in the configured mode; returns its summary."""
    if config.diloco.mode == "distributed":
        from recipes.distributed.run import run_distributed

        return run_distributed(config, command)
    return simulate(config, command)


def simulate(config: RecipeConfig, command: str | None = None) -> dict[str, Any]:
    d, o, t = config.data, config.diloco, config.train

    # -- setup ---------------------------------------------------------------------------------------
    output_dir = Path(t.output_dir)
    if t.resume_from is None and (output_dir / "summary.json").exists():
        raise FileExistsError(f"{output_dir} already holds a finished run; pick another output_dir or resume")
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=config.model.mixed_precision,
        log_with=None if t.report_to == "none" else t.report_to,
        project_dir=str(output_dir),
    )
    if accelerator.num_processes != 1:
        raise RuntimeError(
            f"mode=simulate runs in one process, but {accelerator.num_processes} were launched; "
            "use mode=distributed for one worker per process"
        )
    if not t.progress:  # subprocess runs of compare.py: keep their logs readable
        quiet_libraries()
    seed_everything(t.seed)

    # -- data, model, warm start ---------------------------------------------------------------------
    shards, validation, metadata = load_data(config)
    tokenizer = AutoTokenizer.from_pretrained(str(Path(d.data_dir) / "tokenizer"))
    tokens_per_step = [p * d.batch_size * int(metadata["seq_len"]) for p in config.group_sizes]
    model = make_model(config, metadata).to(accelerator.device)  # also the evaluation / export model
    warm_optimizer_state = (
        None if t.resume_from is not None else warm_start(config, model, shards, metadata, accelerator)
    )

    # -- server and workers --------------------------------------------------------------------------
    aggregator = build_aggregator(config, [p.detach().clone().float() for p in model.parameters()])
    simulator = build_simulator(config, aggregator, model, shards, warm_optimizer_state, accelerator)
    clock, steps = simulator.clock, simulator.inner_steps_per_worker
    schedule = RunSchedule(t)

    # -- resume or start -----------------------------------------------------------------------------
    metrics_lines = None
    if t.resume_from is not None:
        path = find_checkpoint(output_dir, t.resume_from)
        state = read_checkpoint(path, "simulate")
        aggregator.load_state_dict(state.aggregator)
        simulator.load_state_dict(state.workers)
        schedule.load_state_dict(state.schedule)
        set_rng_state(state.rng)
        metrics_lines = state.metrics_lines
        accelerator.print(f"resumed from {path}")
    else:
        simulator.start()
    log = MetricsLog(output_dir / "metrics.jsonl", accelerator, keep_lines=metrics_lines)
    accelerator.init_trackers(output_dir.name, config={k: str(v) for k, v in config.to_dict().items()})
    evaluator = Evaluator(model, validation, d.eval_batch_size or d.batch_size, accelerator.autocast, log)
    pusher = None
    if t.push_to_hub:
        from recipes.hub import CheckpointPusher

        pusher = CheckpointPusher(config, metadata, output_dir, command)
    accelerator.print(
        f"{o.method}: K={o.num_workers} speeds={o.worker_speeds} H={steps} model={count_parameters(model) / 1e6:.2f}M "
        f"params outer_lr={config.outer_lr} budget tokens={t.budget_tokens} time={t.budget_time}"
    )

    def evaluate(at: float, reason: str) -> dict[str, float]:
        """The global model now (``at``: the virtual time it stands for)."""
        return evaluator(
            aggregator.global_params,
            reason,
            arrival=schedule.arrivals,
            time=at,
            tokens=schedule.tokens,
            version=aggregator.version,
        )

    def checkpoint(at: float, losses: dict[str, float] | None = None, periodic: bool = True) -> None:
        """Write ``checkpoint-<arrivals>``. A periodic one that fails (a full disk) is logged and
        training goes on, the next one retries; the final one raises."""
        path = output_dir / f"checkpoint-{schedule.arrivals}"
        state = RunState(
            mode="simulate",
            schedule=schedule.state_dict(),
            aggregator=aggregator.state_dict(),
            metrics_lines=log.lines,
            inner_steps=steps,
            workers=simulator.state_dict(),
            rng=rng_state(),
            info={"time": at, "version": aggregator.version},
        )
        model_now = evaluator.load(aggregator.global_params)
        try:
            write_checkpoint(path, state, model=model_now, tokenizer=tokenizer, config=config)
        except OSError as e:
            if not periodic:
                raise final_checkpoint_error(path, e) from e
            logger.error("checkpoint %s failed (%s); training goes on, the next checkpoint retries", path, e)
            return
        if pusher is not None:
            losses = losses or evaluate(at, "checkpoint")
            pusher.push_checkpoint(path, schedule.tokens, aggregator.version, losses)

    driver = RunDriver(
        schedule, aggregator, log, steps, tokens_per_step, InlineServices(evaluate, checkpoint)
    )
    driver.evaluate_start()

    # -- the rounds: the next worker to arrive runs its round and submits ------------------------------
    started = time.perf_counter()
    stop_reason = run_rounds(simulator, driver, t.progress)
    if stop_reason == "interrupted":  # behave like a crash: no final checkpoint, no summary
        log.close()
        accelerator.end_training()
        return {"interrupted": True, "arrivals": schedule.arrivals}

    # -- final evaluation, checkpoint, summary -------------------------------------------------------
    driver.evaluate_end()
    final = evaluate(clock.now, "final")
    checkpoint(clock.now, final, periodic=False)
    summary = driver.summary(
        config,
        time=clock.now,
        stop_reason=stop_reason,
        final=final,
        busy=list(clock.busy),
        idle=list(clock.idle),
        elapsed=time.perf_counter() - started,
        hub_pushes=pusher.close() if pusher is not None else None,
    )
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.close()
    accelerator.end_training()
    accelerator.print(f"final mean val loss {final['mean']:.4f} after {schedule.tokens} tokens")
    return summary


def build_simulator(
    config: RecipeConfig,
    aggregator: AsyncAggregator,
    model: torch.nn.Module,
    shards: list[torch.Tensor],
    warm_optimizer_state: dict[str, Any] | None,
    accelerator: Accelerator,
) -> Simulator:
    """K replicas of ``model``, each with its own inner AdamW (seeded with the warm start's state),
    its own shard's data stream, its round length and its codec state (error feedback), on a virtual
    clock of the configured speeds and network."""
    d, o, t = config.data, config.diloco, config.train
    steps = (
        dylu_steps(o.worker_speeds, o.inner_steps, o.dylu_power)
        if config.uses_dylu
        else [o.inner_steps] * o.num_workers
    )
    buffer_device = torch.device("cpu") if o.offload_idle_workers else accelerator.device
    transport = server_transport(config, aggregator)  # decodes Δ; with downlink delta, encodes replies
    workers = []
    for k in range(o.num_workers):
        replica = copy.deepcopy(model)
        optimizer = make_inner_optimizer(config, replica, warm_optimizer_state)
        stream = TokenStream(shards[k], config.group_sizes[k] * d.batch_size, t.seed, stream_id=k)
        loop = InnerLoop(config, replica, optimizer, stream, accelerator)
        codec = uplink_encoder(config)
        workers.append(
            SimulatedWorker(k, loop, transport, steps[k], buffer_device, codec=codec, overlap=o.overlap)
        )
    clock = VirtualClock(o.worker_speeds, o.speed_jitter, t.seed, network=network_model(config))
    return Simulator(config, aggregator, workers, clock, accelerator)


def run_rounds(simulator: Simulator, driver: RunDriver, progress_bar: bool) -> str:
    """Arrival after arrival until the budget is spent; returns why it stopped: ``budget_tokens``,
    ``budget_time``, or ``interrupted`` when ``stop_after_arrivals`` cut it short. With a simulated
    network some steps are not arrivals (a round's end whose message is still on its way, a reply
    delivered): the budget and the time evaluations are checked before each, the rest only after
    an arrival."""
    clock, schedule = simulator.clock, driver.schedule
    bar = tqdm(
        total=1.0,
        desc=simulator.config.diloco.method,
        disable=not progress_bar,
        bar_format="{l_bar}{bar}| {elapsed}<{remaining}",
    )
    try:
        while not driver.finished():
            bar.n = min(schedule.progress(clock.now), 1.0)
            bar.set_postfix(arrivals=schedule.arrivals, version=simulator.aggregator.version)
            if not driver.admit(simulator.next_time()):
                return "budget_time"
            arrival = simulator.step(progress=lambda: schedule.progress(clock.now))
            if arrival is None:
                continue
            arrived = driver.arrived(
                arrival.worker,
                arrival.update,
                arrival.time,
                train_loss=arrival.train_loss,
                data_checksum=arrival.data_checksum,
            )
            if arrived.interrupt:
                return "interrupted"
        return "budget_tokens"
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_config(argv)
    command = " ".join(["recipes/train.py", *(sys.argv[1:] if argv is None else argv)])
    with removed_if_failed_early(config.train.output_dir, started_when=rounds_recorded):
        return run(config, command)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)
