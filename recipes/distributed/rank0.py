"""Distributed mode, rank 0's services beside its own worker: the metrics log, the evaluation model,
the checkpoint writer and the Hub pusher, the ``Gate`` in front of the aggregator and the
``Background`` thread; then, once the run stops, its shutdown: the final evaluations and checkpoint,
the other ranks' reports and ``summary.json``."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer

from heloco.checkpoint import atomic_write_text
from recipes.config import RecipeConfig
from recipes.distributed.gate import Background, Gate, Snapshot
from recipes.distributed.logs import LockedLog
from recipes.distributed.setup import START_KEY, Job, Signals, collect_reports
from recipes.distributed.store import job_store
from recipes.evaluation import Evaluator
from recipes.methods import build_aggregator
from recipes.model import count_parameters
from recipes.run_state import RunState, final_checkpoint_error, read_checkpoint, write_checkpoint
from recipes.tracking import MetricsLog

if TYPE_CHECKING:
    from heloco.transport import ServerHandle


def keep_records_until(path: Path, arrivals: int) -> int:
    """Resuming: keep the metrics records of arrivals up to the checkpoint's (evaluations are
    written by the background thread, so records of later arrivals may come before them in the
    file); rewrite the file with them and return their count."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("arrival", 0) <= arrivals]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(kept)


@dataclass
class WorkerOutcome:
    """How a rank's worker ended: its report, or rank 0's interrupt or failure (the run still ends
    with a final checkpoint; the error is raised after it)."""

    report: dict[str, Any]
    interrupted: bool = False
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        """Ended by the run's own rules: only then is there a final evaluation and a summary."""
        return not self.interrupted and self.error is None

    @property
    def stop_reason(self) -> str:
        return (
            "interrupted"
            if self.interrupted
            else "error"
            if self.error is not None
            else self.report["reason"]
        )


class RankZero:
    """Rank 0's services; created after setup, before the transport (the gate is what it serves)."""

    def __init__(self, config: RecipeConfig, job: Job, command: str | None) -> None:
        d, t = config.data, config.train
        self.config = config
        self.job = job
        self.output_dir = Path(t.output_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(Path(d.data_dir) / "tokenizer"))
        resumed = read_checkpoint(job.resume.path, "distributed") if job.resume is not None else None
        keep_lines = None
        if resumed is not None:  # the log as it stood at the checkpoint
            keep_lines = keep_records_until(self.output_dir / "metrics.jsonl", resumed.schedule["arrivals"])
        self.log = LockedLog(
            MetricsLog(self.output_dir / "metrics.jsonl", job.accelerator, keep_lines=keep_lines)
        )
        eval_model = copy.deepcopy(job.model)  # evaluation / export model
        batch_size = d.eval_batch_size or d.batch_size
        self.evaluator = Evaluator(eval_model, job.validation, batch_size, job.accelerator.autocast, self.log)
        self.pusher = None
        if t.push_to_hub:
            from recipes.hub import CheckpointPusher

            self.pusher = CheckpointPusher(config, job.metadata, self.output_dir, command)
        self.server: ServerHandle | None = None  # set once it serves (``connect``)
        self.background = Background(self.evaluate, self.checkpoint)
        masters = [p.detach().clone().float() for p in job.model.parameters()]
        tokens_per_step = [p * d.batch_size * int(job.metadata["seq_len"]) for p in config.group_sizes]
        aggregator = build_aggregator(config, masters)
        self.gate = Gate(aggregator, config, job.steps, tokens_per_step, self.log, self.background)
        if resumed is not None:
            aggregator.load_state_dict(resumed.aggregator)
            self.gate.restore(resumed.schedule, resumed.workers["submissions"], float(resumed.info["time"]))

    # -- evaluation and checkpoints (the background thread's jobs, and the final ones) ---------------
    def evaluate(self, reason: str, info: dict[str, Any], params: list[torch.Tensor]) -> dict[str, float]:
        """Score ``params`` and log the ``eval`` record (``info``: arrival, time, tokens, version)."""
        losses = self.evaluator(params, reason, **info)
        if self.config.train.progress:
            self.job.accelerator.print(
                f"[{reason}] version {info['version']} tokens {info['tokens']} "
                f"time {info['time']:.1f}s val loss {losses['mean']:.4f}"
            )
        return losses

    def checkpoint(self, snapshot: Snapshot, losses: dict[str, float] | None = None) -> Path:
        """Write ``snapshot`` as ``checkpoint-<arrivals>/`` (the server's part; each worker writes its
        own, see ``recipes.distributed.worker_state``), then push it to the Hub if asked."""
        path = self.output_dir / f"checkpoint-{snapshot.schedule['arrivals']}"
        info: dict[str, Any] = {"time": snapshot.time, "version": snapshot.version}
        if snapshot.stop_reason is not None:
            info["stop_reason"] = snapshot.stop_reason
        state = RunState(
            mode="distributed",
            schedule=snapshot.schedule,
            aggregator=snapshot.aggregator,
            metrics_lines=snapshot.metrics_lines,
            inner_steps=self.job.steps,
            workers={"submissions": snapshot.submissions, "gone": self.gone_workers()},
            rng=None,
            info=info,
        )
        model = self.evaluator.load(snapshot.aggregator["global_params"])
        write_checkpoint(path, state, model=model, tokenizer=self.tokenizer, config=self.config)
        if self.pusher is not None:
            params = snapshot.aggregator["global_params"]
            losses = losses or self.evaluate("checkpoint", snapshot.eval_info(), params)
            self.pusher.push_checkpoint(path, snapshot.schedule["tokens"], snapshot.version, losses)
        return path

    def gone_workers(self) -> list[int]:
        """Workers the server has lost (dead, left, waiting to rejoin): a checkpoint does not wait
        for their state, and a resume starts them from their newest own state on disk."""
        if self.server is None:
            return []
        return [w["worker"] for w in self.server.worker_stats() if not w["alive"]]

    # -- the run -------------------------------------------------------------------------------------
    def start(self, start: float, signals: Signals) -> None:
        """The rounds start (after the barrier): SIGTERM becomes an interrupt, trackers and the
        background thread start, the gate's clock starts with the ``start`` evaluation."""
        config, job = self.config, self.job
        o, t = config.diloco, config.train
        job_store().set(START_KEY, repr(time.time()))  # for workers that rejoin later
        signals.interrupt()
        job.accelerator.init_trackers(
            self.output_dir.name, config={k: str(v) for k, v in config.to_dict().items()}
        )
        self.background.start()
        self.gate.start(start)
        job.accelerator.print(
            f"{o.method} distributed: {job.num_workers} workers on {job.world} processes, speeds={o.worker_speeds} "
            f"slowdown={[round(s, 3) for s in job.slowdowns]} H={job.steps} "
            f"model={count_parameters(job.model) / 1e6:.2f}M params outer_lr={config.outer_lr} "
            f"budget tokens={t.budget_tokens} time={t.budget_time}s wire={o.wire_dtype}"
        )

    def shut_down(
        self, outcome: WorkerOutcome, transport: Any, server: ServerHandle, signals: Signals, start: float
    ) -> dict[str, Any]:
        """Stop the server, evaluate (unless interrupted or failed), write the final checkpoint,
        collect the other ranks' reports; returns the summary (written only for a finished run)."""
        gate, background = self.gate, self.background
        gate.close(outcome.stop_reason)
        rejoining = {w["worker"] for w in server.worker_stats() if w["state"] == "rejoining"}
        if transport is not None:  # (none when rank 0 only serves)
            transport.leave(0)
        server.stop()
        background.finish(cancel=outcome.interrupted)
        final = self.evaluate_end() if outcome.finished else None
        snapshot = gate.final_snapshot()
        try:
            path = self.checkpoint(snapshot, final)
        except OSError as e:  # a full disk: say what a resume can still use
            raise final_checkpoint_error(
                self.output_dir / f"checkpoint-{snapshot.schedule['arrivals']}", e
            ) from e
        self.job.accelerator.print(f"final checkpoint {path}")
        timeout = 5.0 if outcome.interrupted else self.config.diloco.comm_timeout_s
        job = self.job
        worker_of = [r if job.layout is None else job.layout.worker_of(r) for r in range(job.world)]
        reports = collect_reports(job_store(), server, job.world, rejoining, timeout, signals, worker_of)
        reports[0] = outcome.report
        hub_history = self.pusher.close() if self.pusher is not None else None
        summary = self.summary(reports, server, final, time.monotonic() - start, hub_history)
        if outcome.finished:  # like the simulator: only a finished run has a summary
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.job.accelerator.print(f"final mean val loss {final['mean']:.4f} after {gate.tokens} tokens")
        return summary

    def evaluate_end(self) -> dict[str, float]:
        """The ``eval_times`` not reached yet and the final evaluation, all of the model as it ended."""
        gate = self.gate
        params, version = gate.aggregator.snapshot()
        end = {"arrival": gate.arrivals, "time": gate.close_time, "tokens": gate.tokens, "version": version}
        for at in gate.schedule.eval_times_before(math.inf):
            self.evaluate("time", {**end, "time": at}, params)
        return self.evaluate("final", end, params)

    def summary(
        self,
        reports: dict[int, dict[str, Any]],
        server: ServerHandle,
        final: dict[str, float] | None,
        elapsed: float,
        hub_history: Any,
    ) -> dict[str, Any]:
        gate, job = self.gate, self.job
        ranks = [reports.get(r) for r in range(job.world)]
        return gate.driver.summary(
            self.config,
            time=gate.close_time,
            stop_reason=gate.stop_reason,
            final=final,
            busy=[r.get("busy_s") if r else None for r in ranks],
            idle=[r.get("idle_s") if r else None for r in ranks],
            elapsed=elapsed,
            hub_pushes=hub_history,
            evals_skipped=gate.evals_skipped,
            background_error=repr(self.background.error) if self.background.error else None,
            distributed={
                "world_size": job.world,
                "ranks": ranks,
                "measured_speeds": job.measured if self.config.uses_dylu else None,
                "slowdown": job.slowdowns,
                "server": server.worker_stats(),
            },
        )

    def close(self) -> None:
        self.log.close()
