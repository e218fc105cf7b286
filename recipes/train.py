"""Train per-worker Llama replicas with (async) DiLoCo, Delayed Nesterov, look-ahead or HeLoCo.

    accelerate launch recipes/train.py --config recipes/configs/simulate.yaml [--key value ...]
    python recipes/train.py --config recipes/configs/simulate.yaml            # one process is enough

mode=simulate (default): K virtual workers in one process on one device. A deterministic virtual clock
(speeds in inner steps per virtual second) decides who arrives when; a worker's round (H inner AdamW
steps on its own shard) is computed when it arrives, from the parameters it was dispatched. Each worker
keeps its own parameters, AdamW state and data position across rounds.

mode=distributed: one worker per process (`accelerate launch --num_processes N`), the server in a
thread on rank 0; see recipes/distributed.py.

The script reads top to bottom: setup → data → warm start → server + workers → event loop → final
eval, checkpoint and summary.
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from heloco import DiLoCoWorker, InProcessTransport
from heloco.checkpoint import (
    atomic_directory,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    save_state,
)
from heloco.simulation import VirtualClock, dylu_steps
from recipes.common import (
    begin_round,
    inner_step,
    load_data,
    make_inner_optimizer,
    make_model,
    rng_state,
    set_inner_lr,
    set_rng_state,
    warm_start,
)
from recipes.config import RecipeConfig, parse_config
from recipes.data import TokenStream, eval_record, evaluate_metrics
from recipes.methods import build_aggregator
from recipes.model import count_parameters
from recipes.tracking import MetricsLog

# ---------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(run: dict[str, Any], path: Path) -> None:
    """Everything needed to continue bit for bit, written atomically."""
    config: RecipeConfig = run["config"]
    with atomic_directory(path) as tmp:
        global_model = run["global_model"]
        load_global(run)
        global_model.save_pretrained(tmp / "model")
        run["tokenizer"].save_pretrained(tmp / "model")
        save_state(tmp, "aggregator", run["aggregator"].state_dict())
        save_state(
            tmp,
            "workers",
            [
                {
                    "model": w.model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "worker": w.state_dict(),
                    "stream": s.state_dict(),
                }
                for w, opt, s in zip(run["workers"], run["optimizers"], run["streams"], strict=True)
            ],
        )
        save_state(
            tmp,
            "run",
            {
                "clock": run["clock"].state_dict(),
                "counters": dict(run["counters"]),
                "waiting": sorted(run["waiting"]),
                "pending_eval_times": list(run["pending_eval_times"]),
                "metrics_lines": run["log"].lines,
                "rng": rng_state(),
            },
        )
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    prune_checkpoints(path.parent, config.train.keep_checkpoints)


def resume(run: dict[str, Any], path: Path) -> dict[str, Any]:
    workers_state = load_state(path, "workers")
    run["aggregator"].load_state_dict(load_state(path, "aggregator"))
    for w, opt, s, state in zip(
        run["workers"], run["optimizers"], run["streams"], workers_state, strict=True
    ):
        w.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        w.load_state_dict(state["worker"])
        s.load_state_dict(state["stream"])
    state = load_state(path, "run")
    run["clock"].load_state_dict(state["clock"])
    run["counters"].update(state["counters"])
    run["waiting"] = set(state["waiting"])
    run["pending_eval_times"] = list(state["pending_eval_times"])
    set_rng_state(state["rng"])
    return state


def load_global(run: dict[str, Any]) -> None:
    """Copy the server's master parameters into the evaluation/export model."""
    with torch.no_grad():
        torch._foreach_copy_(list(run["global_model"].parameters()), run["aggregator"].global_params)


# ---------------------------------------------------------------------------------------------------
# the run


def run(config: RecipeConfig, command: str | None = None) -> dict[str, Any]:
    d, o, t = config.data, config.diloco, config.train
    if o.mode == "distributed":
        from recipes.distributed import run_distributed

        return run_distributed(config, command)

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
    device = accelerator.device
    if not t.progress:  # subprocess runs of compare.py: keep their logs readable
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)

    # -- data ----------------------------------------------------------------------------------------
    shards, validation, metadata = load_data(config)
    tokenizer = AutoTokenizer.from_pretrained(str(Path(d.data_dir) / "tokenizer"))
    seq_len = int(metadata["seq_len"])

    # -- model and warm start ------------------------------------------------------------------------
    model = make_model(config, metadata).to(device)
    warm_optimizer_state = None
    if t.resume_from is None:
        warm_optimizer_state = warm_start(config, model, shards, metadata, accelerator)

    # -- server and workers --------------------------------------------------------------------------
    global_params = [p.detach().clone().float() for p in model.parameters()]
    aggregator = build_aggregator(config, global_params)
    transport = InProcessTransport(aggregator)
    steps = dylu_steps(o.worker_speeds, o.inner_steps) if o.dylu else [o.inner_steps] * o.num_workers
    idle_device = torch.device("cpu") if o.offload_idle_workers else device
    workers, optimizers, streams = [], [], []
    for k in range(o.num_workers):
        replica = copy.deepcopy(model)
        optimizer = make_inner_optimizer(config, replica)
        if warm_optimizer_state is not None:  # a copy each: load_state_dict keeps same-device tensors shared
            optimizer.load_state_dict(copy.deepcopy(warm_optimizer_state))
        workers.append(DiLoCoWorker(replica, optimizer, transport, k, steps[k], start_device=idle_device))
        optimizers.append(optimizer)
        streams.append(TokenStream(shards[k], d.batch_size, t.seed, stream_id=k))
    global_model = model  # reused as the evaluation / export model
    clock = VirtualClock(o.worker_speeds, o.speed_jitter, t.seed)
    run_state: dict[str, Any] = {
        "config": config,
        "aggregator": aggregator,
        "workers": workers,
        "optimizers": optimizers,
        "streams": streams,
        "clock": clock,
        "global_model": global_model,
        "tokenizer": tokenizer,
        "counters": {"arrivals": 0, "tokens": 0, "last_eval_version": -1},
        "waiting": set(),
        "pending_eval_times": sorted(t.eval_times),
    }

    # -- resume or start -----------------------------------------------------------------------------
    metrics_lines = None
    if t.resume_from is not None:
        path = latest_checkpoint(output_dir) if t.resume_from == "latest" else Path(t.resume_from)
        if path is None or not path.exists():
            raise FileNotFoundError(f"resume_from={t.resume_from!r}: no checkpoint found in {output_dir}")
        metrics_lines = resume(run_state, path)["metrics_lines"]
        accelerator.print(f"resumed from {path}")
    else:
        for k, worker in enumerate(workers):
            worker.pull()
            clock.start(k, steps[k])
    log = MetricsLog(output_dir / "metrics.jsonl", accelerator, keep_lines=metrics_lines)
    run_state["log"] = log
    accelerator.init_trackers(output_dir.name, config={k: str(v) for k, v in config.to_dict().items()})
    counters, waiting = run_state["counters"], run_state["waiting"]
    tokens_per_step = d.batch_size * seq_len
    autocast = accelerator.autocast
    accelerator.print(
        f"{o.method}: K={o.num_workers} speeds={o.worker_speeds} H={steps} model={count_parameters(model) / 1e6:.2f}M "
        f"params outer_lr={config.outer_lr} budget tokens={t.budget_tokens} time={t.budget_time}"
    )

    def progress() -> float:
        parts = []
        if t.budget_tokens:
            parts.append(counters["tokens"] / t.budget_tokens)
        if t.budget_time:
            parts.append(clock.now / t.budget_time)
        return max(parts)

    def run_eval(virtual_time: float, reason: str) -> dict[str, float]:
        load_global(run_state)
        losses, accuracies = evaluate_metrics(
            global_model, validation, d.eval_batch_size or d.batch_size, device, autocast
        )
        counters["last_eval_version"] = aggregator.version
        record = {
            "event": "eval",
            "reason": reason,
            "arrival": counters["arrivals"],
            "time": virtual_time,
            "tokens": counters["tokens"],
            "version": aggregator.version,
            **eval_record(losses, accuracies),
        }
        log.write(record, step=counters["arrivals"])
        return losses

    def checkpoint(losses: dict[str, float] | None = None) -> None:
        path = output_dir / f"checkpoint-{counters['arrivals']}"
        save_checkpoint(run_state, path)
        if pusher is not None:
            losses = losses or run_eval(clock.now, "checkpoint")
            pusher.push_checkpoint(path, counters["tokens"], aggregator.version, losses)

    pusher = None
    if t.push_to_hub:
        from recipes.hub import CheckpointPusher

        pusher = CheckpointPusher(config, metadata, output_dir, command)

    if counters["arrivals"] == 0 and counters["last_eval_version"] < 0:
        run_eval(0.0, "start")

    # -- event loop ----------------------------------------------------------------------------------
    bar = tqdm(
        total=1.0, desc=o.method, disable=not t.progress, bar_format="{l_bar}{bar}| {elapsed}<{remaining}"
    )
    bar.update(min(progress(), 1.0))
    started = time.perf_counter()
    interrupted = False
    while True:
        next_time = clock.peek()
        if next_time is None:
            raise RuntimeError("no worker in flight (this is a bug)")
        if t.budget_time is not None and next_time > t.budget_time:
            break
        if t.budget_tokens is not None and counters["tokens"] >= t.budget_tokens and not waiting:
            break
        while run_state["pending_eval_times"] and run_state["pending_eval_times"][0] < next_time:
            run_eval(run_state["pending_eval_times"].pop(0), "time")

        now, k = clock.pop()
        worker, optimizer, stream = workers[k], optimizers[k], streams[k]
        begin_round(config, optimizer)
        per_step_lr = t.lr_schedule == "worker_cosine"
        set_inner_lr(config, optimizer, progress(), worker.local_step)
        if o.offload_idle_workers:
            move_worker(worker.model, optimizer, device)
        loss_sum = torch.zeros((), device=device)
        checksum = 0
        with worker:  # the hook submits Δ after the H-th step and loads the server's answer
            for _ in range(worker.sync_every):
                if per_step_lr:
                    set_inner_lr(config, optimizer, progress(), worker.local_step)
                batch = stream.next_batch()
                checksum += int(batch.sum())
                loss_sum += inner_step(worker.model, optimizer, batch.to(device), accelerator, t.grad_clip)
        if o.offload_idle_workers:
            move_worker(worker.model, optimizer, idle_device)
        update = worker.last_update
        counters["arrivals"] += 1
        counters["tokens"] += worker.sync_every * tokens_per_step
        if update.params is None:
            waiting.add(k)
        else:
            clock.start(k, steps[k])
        for r in update.released:
            waiting.discard(r)
            workers[r].pull()
            clock.start(r, steps[r])
        log.write(
            {
                "event": "arrival",
                "arrival": counters["arrivals"],
                "time": now,
                "tokens": counters["tokens"],
                "worker": k,
                "inner_steps": worker.sync_every,
                "train_loss": float(loss_sum) / worker.sync_every,
                "staleness": update.staleness,
                "weight": update.weight,
                "applied": update.applied,
                "dropped": update.dropped,
                "version": aggregator.version,
                "data_checksum": checksum,
                **{k2: v for k2, v in update.stats.items() if k2 not in ("staleness", "weight")},
            },
            step=counters["arrivals"],
        )
        if update.applied and aggregator.version % t.eval_every == 0:
            run_eval(now, "updates")
        bar.n = min(progress(), 1.0)
        bar.set_postfix(arrivals=counters["arrivals"], version=aggregator.version, refresh=False)
        bar.refresh()
        if t.save_every and counters["arrivals"] % t.save_every == 0:
            checkpoint()
        if t.stop_after_arrivals is not None and counters["arrivals"] >= t.stop_after_arrivals:
            interrupted = True
            break
    bar.close()
    if interrupted:  # behave like a crash: no final checkpoint, no summary
        log.close()
        accelerator.end_training()
        return {"interrupted": True, "arrivals": counters["arrivals"]}

    # -- final eval, checkpoint, summary -------------------------------------------------------------
    for pending_time in run_state["pending_eval_times"]:
        run_eval(pending_time, "time")
    run_state["pending_eval_times"] = []
    final = run_eval(clock.now, "final")
    checkpoint(final)
    hub_history = pusher.close() if pusher is not None else None
    summary = {
        "method": o.method,
        "outer_lr": config.outer_lr,
        "seed": t.seed,
        "arrivals": counters["arrivals"],
        "outer_updates": aggregator.version,
        "tokens": counters["tokens"],
        "virtual_time": clock.now,
        "final_val_loss": final,
        "idle_time": clock.idle,
        "busy_time": clock.busy,
        "workers": aggregator.worker_stats(),
        "elapsed_s": time.perf_counter() - started,
        "hub_pushes": hub_history,
        "config": config.to_dict(),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.close()
    accelerator.end_training()
    accelerator.print(f"final mean val loss {final['mean']:.4f} after {counters['tokens']} tokens")
    return summary


def move_worker(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move an idle simulated worker (parameters and AdamW state) between host and accelerator."""
    model.to(device)
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                state[key] = value.to(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_config(argv)
    command = " ".join(["recipes/train.py", *(sys.argv[1:] if argv is None else argv)])
    return run(config, command)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
