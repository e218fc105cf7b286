"""Distributed mode, resuming: which checkpoint every rank can continue from.

A checkpoint is complete when rank 0's part (``checkpoint-<arrivals>/``, the server) exists and
verifies and every worker r that had submitted holds its state as of the submission the server
recorded (``recipes.distributed.worker_state``), on its own disk. Choosing is one collective step of the setup:
every rank reports the worker states it holds, rank 0 picks the newest complete checkpoint (or checks
the one named) and tells everyone. ``resume_from: latest`` asks for this; so does a restart by the
launcher (``accelerate launch --max_restarts N`` / torchrun sets ``TORCHELASTIC_RESTART_COUNT``),
so a crash of any rank costs at most the work since the last complete checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from heloco.checkpoint import list_checkpoints
from recipes.config import RecipeConfig
from recipes.distributed.store import RESTART_ENV
from recipes.distributed.worker_state import WorkerState, available_submissions
from recipes.run_state import RunState, read_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ResumePoint:
    """Where this rank continues: the checkpoint, and its own state in it (None: it had not
    submitted yet, it starts from the warm start)."""

    path: Path
    submissions: list[int]  # per worker, as the server recorded them
    worker: WorkerState | None


def resume_request(config: RecipeConfig) -> str | None:
    """``resume_from`` as configured, or ``latest`` when the launcher restarted the job and the run
    has checkpoints."""
    t = config.train
    if t.resume_from is not None:
        return t.resume_from
    restarted = int(os.environ.get(RESTART_ENV, "0") or 0) > 0
    if restarted and list_checkpoints(t.output_dir):
        logger.warning(
            "restart %s of the job: resuming from the latest complete checkpoint", os.environ[RESTART_ENV]
        )
        return "latest"
    return None


def choose_resume_point(
    config: RecipeConfig, accelerator: Accelerator, worker_of: list[int | None] | None = None
) -> ResumePoint | None:
    """Collective (every rank calls it): the checkpoint to resume from, or None to start afresh.
    ``worker_of[r]``: rank r's worker (default: worker = rank); every rank of a group resumes its own
    state as of its worker's recorded submission."""
    wanted = resume_request(config)
    if wanted is None:
        return None
    output_dir = Path(config.train.output_dir)
    held = gather_object([available_submissions(output_dir, accelerator.process_index, verify=True)])
    choice: list[object] = [None]
    if accelerator.is_main_process:
        try:
            choice[0] = pick_checkpoint(output_dir, wanted, held, worker_of)
        except (FileNotFoundError, ValueError) as e:
            choice[0] = e  # every rank raises it, not only rank 0
    broadcast_object_list(choice, from_process=0)
    if isinstance(choice[0], Exception):
        raise choice[0]
    path, submissions, gone = choice[0]  # type: ignore[misc]
    rank = accelerator.process_index
    worker = rank if worker_of is None else worker_of[rank]
    if worker is None:  # a server process of its own keeps no worker state
        return ResumePoint(Path(path), list(submissions), None)
    mine = own_state_for(submissions[worker], held[rank], worker in gone)
    state = WorkerState.read(output_dir, rank, mine) if mine is not None else None
    return ResumePoint(Path(path), list(submissions), state)


def own_state_for(submission: int, held: list[int], gone: bool) -> int | None:
    """Which of its states a rank resumes from: the one the checkpoint recorded; for a worker the
    server had lost by then, its newest one up to that (or none: the warm start)."""
    if submission > 0 and submission in held:
        return submission
    if gone:
        return max((s for s in held if s <= submission), default=None)
    return None


def pick_checkpoint(
    output_dir: Path, wanted: str, held: list[list[int]], worker_of: list[int | None] | None = None
) -> tuple[str, list[int], list[int]]:
    """The newest complete checkpoint (``wanted="latest"``) or the named one if complete, with the
    submissions it recorded and the workers the server had lost; raises naming what is missing
    otherwise. ``held[r]``: the worker states rank r holds; ``worker_of[r]``: its worker (default:
    worker = rank). A lost worker's states are not required."""
    worker_of = list(range(len(held))) if worker_of is None else worker_of
    num_workers = max(w for w in worker_of if w is not None) + 1
    if wanted == "latest":
        candidates = list(reversed(list_checkpoints(output_dir)))
    elif Path(wanted).is_dir():
        candidates = [Path(wanted)]
    else:
        raise FileNotFoundError(
            f"resume_from={wanted!r}: no checkpoint directory there (a path, relative to the current "
            f"directory, e.g. {output_dir / 'checkpoint-<n>'}; or 'latest')"
        )
    refused = []
    for path in candidates:
        try:
            state = read_checkpoint(path, "distributed")
            submissions = server_submissions(state)
        except (OSError, ValueError) as e:
            refused.append(f"{path.name}: {e}")
        else:
            if len(submissions) != num_workers:
                raise ValueError(
                    f"{path} was written by a run of {len(submissions)} workers, this one has "
                    f"{num_workers} (num_workers must stay the same to resume)"
                )
            gone = [int(w) for w in state.workers.get("gone", [])]
            missing = [
                r
                for r, w in enumerate(worker_of)
                if w is not None and submissions[w] > 0 and submissions[w] not in held[r] and w not in gone
            ]
            if not missing:
                return str(path), submissions, gone
            refused.append(f"{path.name}: no worker state from rank(s) {missing}")
        logger.warning("not resuming from %s", refused[-1])
    raise FileNotFoundError(
        f"resume_from={wanted!r}: no complete checkpoint in {output_dir}"
        + (f" (refused: {'; '.join(refused)})" if refused else "")
    )


def server_submissions(state: RunState) -> list[int]:
    """Per worker, how many submissions the server had taken at this checkpoint."""
    if not state.workers or "submissions" not in state.workers:
        raise ValueError("a distributed checkpoint without per-worker submission counts (older format)")
    return [int(s) for s in state.workers["submissions"]]
