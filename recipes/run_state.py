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
- ``config.json``: the run's configuration;
- ``manifest.json``, written last: the format version and every other file's relative path, size
  and sha256.

It is written into a temporary sibling and renamed into place when complete
(``heloco.checkpoint.atomic_directory``), so a directory named ``checkpoint-<n>`` is always whole
when it is written; a failed write (a full disk) leaves the previous checkpoint as it was. The
manifest catches what happens to it afterwards (a truncated copy, a flipped bit, a deleted file):
``read_checkpoint`` verifies it before using it, and ``find_checkpoint(..., "latest")`` skips
checkpoints that fail, with a warning, and resumes from the newest one that verifies.

The cost: every byte is read back and hashed once when a checkpoint is written and twice on resume
(``find_checkpoint`` and ``read_checkpoint`` both verify): sha256 in 1 MiB chunks runs at about
0.5-2 GB/s on one core, so about a second per GB of checkpoint each time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from heloco.checkpoint import (
    atomic_directory,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    save_state,
)
from recipes.config import RecipeConfig

FORMAT_VERSION = 2  # 1: the simulator's and distributed mode's separate layouts before the redesign

MANIFEST = "manifest.json"
_CHUNK = 1 << 20  # bytes hashed at a time

Mode = Literal["simulate", "distributed"]

logger = logging.getLogger(__name__)


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files do not match its manifest (or that has none): never resumed from."""


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
        write_manifest(tmp)
    prune_checkpoints(path.parent, config.train.keep_checkpoints)
    return path


def read_checkpoint(path: Path, mode: Mode) -> RunState:
    """The ``RunState`` in ``path``, refused with a clear error when it does not verify
    (``CorruptCheckpoint``) or is another mode's or another format's."""
    verify_checkpoint(path)
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
    """``resume_from``: a checkpoint directory (it must verify), or ``latest`` for the newest one of
    the run that verifies; those refused on the way are logged as warnings."""
    if resume_from == "latest":
        return newest_verified(output_dir)
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from={resume_from!r}: no checkpoint directory {path}")
    verify_checkpoint(path)
    return path


def newest_verified(output_dir: Path) -> Path:
    """The newest ``checkpoint-<n>`` of ``output_dir`` that verifies; a run survives a damaged
    newest checkpoint by resuming from the one before."""
    refused: list[str] = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CorruptCheckpoint as e:
            logger.warning("not resuming from %s: %s", path, e)
            refused.append(str(e))
            continue
        return path
    why = "; refused: " + "; ".join(refused) if refused else ""
    raise FileNotFoundError(f"resume_from='latest': no complete checkpoint in {output_dir}{why}")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoint files can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record every file under ``directory`` (path, size, sha256) in its ``manifest.json``."""
    files = [
        {"path": p.relative_to(directory).as_posix(), "size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    ]
    (directory / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=1))


def verify_checkpoint(path: Path) -> None:
    """Raise ``CorruptCheckpoint`` naming ``path`` and the first file that is missing, has another
    size or another sha256 than the manifest says (files the manifest does not list are ignored).
    Sizes are checked for all files before any is hashed, so a truncated file is found quickly."""
    files = _manifest_files(path)
    for entry in files:
        file = path / entry["path"]
        if not file.is_file():
            raise CorruptCheckpoint(f"checkpoint {path}: {entry['path']} is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CorruptCheckpoint(
                f"checkpoint {path}: {entry['path']} has {size} bytes, the manifest says {entry['size']}"
            )
    for entry in files:
        if file_sha256(path / entry["path"]) != entry["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {path}: {entry['path']} does not match its sha256")


def _manifest_files(path: Path) -> list[dict[str, Any]]:
    """The manifest's file list, or ``CorruptCheckpoint`` when there is no readable manifest."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpoint(
            f"checkpoint {path} has no {MANIFEST} (an incomplete copy, or written by a version of "
            "heloco before checkpoints were verified)"
        )
    try:
        files = json.loads(manifest.read_text())["files"]
        return [{"path": str(f["path"]), "size": int(f["size"]), "sha256": str(f["sha256"])} for f in files]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"checkpoint {path}: {MANIFEST} is unreadable ({e!r})") from e


def final_checkpoint_error(path: Path, error: OSError) -> OSError:
    """The final checkpoint's failure, saying what is left to resume from (the failed write left
    the earlier checkpoints as they were)."""
    last = latest_checkpoint(path.parent)
    left = (
        f"the last complete checkpoint, {last}, is still there (resume_from=latest continues from it)"
        if last is not None
        else "no earlier checkpoint exists"
    )
    return OSError(error.errno, f"the final checkpoint {path} could not be written ({error}); {left}")
