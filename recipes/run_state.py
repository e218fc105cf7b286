"""One checkpoint format for both modes: a typed ``RunState``, one writer and one reader.

A checkpoint directory ``checkpoint-<arrivals>/`` holds

- ``model/``: the global model (``save_pretrained``) and the tokenizer, loadable on its own;
- ``aggregator.{json,safetensors}``: the server (master parameters, outer optimizer, versions, per-worker
  records);
- ``workers.{json,safetensors}``: the workers (simulate: the clock and every worker's replica, inner
  optimizer, data position and round buffers);
- ``run.{json,safetensors}``: the format version, mode, schedule (arrivals, tokens, pending
  evaluations), metrics-log length, round lengths, RNG state and a few facts for people (time,
  version);
- ``config.json``: the run's configuration.

It is written into a temporary sibling and renamed into place when complete
(``heloco.checkpoint.atomic_directory``), so a directory named ``checkpoint-<n>`` is always whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from heloco.checkpoint import atomic_directory, latest_checkpoint, load_state, prune_checkpoints, save_state
from recipes.config import RecipeConfig

FORMAT_VERSION = 2  # 1: the simulator's and distributed mode's separate layouts before the redesign

Mode = Literal["simulate", "distributed"]


@dataclass
class RunState:
    """Everything a run needs to continue where it stood."""

    mode: Mode
    schedule: dict[str, Any]  # RunSchedule.state_dict()
    aggregator: dict[str, Any]  # AsyncAggregator.state_dict()
    metrics_lines: int  # metrics.jsonl is cut back to this many lines on resume
    inner_steps: list[int]  # H of each worker (DyLU may make them differ)
    workers: dict[str, Any] | None = None  # Simulator.state_dict() (simulate)
    rng: dict[str, Any] | None = None  # recipes.common.rng_state()
    info: dict[str, Any] = field(default_factory=dict)  # for people: time, version, stop reason


def write_checkpoint(
    path: Path,
    state: RunState,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    config: RecipeConfig,
) -> Path:
    """Write ``state`` and the exportable global ``model`` atomically to ``path``, then keep only the
    newest ``keep_checkpoints`` checkpoints of the run."""
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        save_state(tmp, "aggregator", state.aggregator)
        if state.workers is not None:
            save_state(tmp, "workers", state.workers)
        save_state(
            tmp,
            "run",
            {
                "format": FORMAT_VERSION,
                "mode": state.mode,
                "schedule": state.schedule,
                "metrics_lines": state.metrics_lines,
                "inner_steps": list(state.inner_steps),
                "rng": state.rng,
                "info": state.info,
            },
        )
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    prune_checkpoints(path.parent, config.train.keep_checkpoints)
    return path


def read_checkpoint(path: Path, mode: Mode) -> RunState:
    """The ``RunState`` in ``path``, refused with a clear error when it is another mode's or another
    format's."""
    run = load_state(path, "run")
    if run.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is a checkpoint of format {run.get('format', 1)}, this version reads format "
            f"{FORMAT_VERSION}; resume it with the version of heloco that wrote it"
        )
    if run["mode"] != mode:
        raise ValueError(f"{path} was written in mode={run['mode']}, this run is mode={mode}")
    workers = load_state(path, "workers") if (path / "workers.json").exists() else None
    return RunState(
        mode=run["mode"],
        schedule=run["schedule"],
        aggregator=load_state(path, "aggregator"),
        metrics_lines=int(run["metrics_lines"]),
        inner_steps=[int(h) for h in run["inner_steps"]],
        workers=workers,
        rng=run["rng"],
        info=run["info"],
    )


def find_checkpoint(output_dir: Path, resume_from: str) -> Path:
    """``resume_from``: a checkpoint directory, or ``latest`` for the newest complete one of the run."""
    path = latest_checkpoint(output_dir) if resume_from == "latest" else Path(resume_from)
    if path is None or not path.exists():
        raise FileNotFoundError(f"resume_from={resume_from!r}: no checkpoint found in {output_dir}")
    return path
