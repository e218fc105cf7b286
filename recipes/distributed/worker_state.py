"""A distributed worker's own part of a checkpoint: its inner optimizer, data position, RNG and round
count, as they stood when it submitted its s-th pseudo-gradient.

Rank 0's checkpoint at arrival N records, for every worker r, how many of r's submissions the
server had taken (s_r). That server state together with each worker's state at its s_r-th submission
is a consistent cut: resuming from it recomputes the rounds that were in flight, and applies none
twice. The server asks for the parts it needs in its replies (``stats["checkpoint_submission"]``);
a worker keeps its state after its latest submission in memory (host copies) until the next one, so
it can write either on request, into ``worker-states/rank{r}/submission-{s}/``, atomically. Ranks
on other machines write to their own disk; ``available_submissions`` tells a resume what each holds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from heloco.checkpoint import atomic_directory, load_state, save_state
from recipes.common import rng_state, set_rng_state
from recipes.config import RecipeConfig
from recipes.data import TokenStream
from recipes.run_state import CorruptCheckpoint, verify_checkpoint, write_manifest

logger = logging.getLogger(__name__)

PART_DIR = "worker-states"
_PART_RE = re.compile(r"^submission-(\d+)$")


def part_path(output_dir: Path, rank: int, submission: int) -> Path:
    return Path(output_dir) / PART_DIR / f"rank{rank}" / f"submission-{submission}"


def available_submissions(output_dir: Path, rank: int, verify: bool = False) -> list[int]:
    """The submissions of ``rank`` whose state is on this machine's disk, oldest first; with
    ``verify``, only those whose files match their manifest (sizes and sha256: a resume)."""
    folder = Path(output_dir) / PART_DIR / f"rank{rank}"
    if not folder.is_dir():
        return []
    found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _PART_RE.match(p.name)) and p.is_dir())
    return [s for s in found if intact(part_path(output_dir, rank, s), verify)]


def intact(path: Path, verify: bool) -> bool:
    if not (path / "worker.json").exists():
        return False
    if not verify:
        return True
    try:
        verify_checkpoint(path)
    except CorruptCheckpoint as e:
        logger.warning("not using worker state %s: %s", path, e)
        return False
    return True


@dataclass
class WorkerState:
    """One worker's state after its ``submission``-th round (host copies)."""

    rank: int
    submission: int
    local_step: int
    optimizer: dict[str, Any]
    stream: dict[str, Any]
    rng: dict[str, Any]
    encoder: dict[str, Any] | None = None  # error feedback's residual, when the worker keeps one

    @classmethod
    def take(
        cls,
        rank: int,
        submission: int,
        local_step: int,
        optimizer: torch.optim.Optimizer,
        stream: TokenStream,
        with_moments: bool = True,
        encoder: Any = None,
    ) -> WorkerState:
        """Copy the state now (the optimizer's tensors to the host), so training may go on.
        ``with_moments=False`` leaves the optimizer's per-parameter state out (a worker whose next
        round starts from a fresh AdamW does not need it). ``encoder``: the worker's Δ encoder; with
        error feedback its residual is part of the state (a resumed worker goes on with it)."""
        state = optimizer.state_dict()
        moments = state["state"] if with_moments else {}
        state = {
            "state": {k: {n: _host_copy(v) for n, v in s.items()} for k, s in moments.items()},
            "param_groups": copy.deepcopy(state["param_groups"]),
        }
        encoder_state = getattr(encoder, "state_dict", None)
        kept = encoder_state() if callable(encoder_state) else None  # state_dict() returns copies
        if kept is not None and kept.get("residuals") is not None:
            kept = {"residuals": [_host_copy(r) for r in kept["residuals"]]}
        return cls(rank, submission, local_step, state, stream.state_dict(), rng_state(), kept)

    def write(self, output_dir: Path, keep: int) -> Path:
        """Write atomically, then keep only this rank's ``keep`` newest parts (``keep <= 0``: all)."""
        path = part_path(output_dir, self.rank, self.submission)
        with atomic_directory(path) as tmp:
            save_state(
                tmp,
                "worker",
                {
                    "rank": self.rank,
                    "submission": self.submission,
                    "local_step": self.local_step,
                    "optimizer": self.optimizer,
                    "stream": self.stream,
                    "rng": self.rng,
                    **({"encoder": self.encoder} if self.encoder is not None else {}),
                },
            )
            write_manifest(tmp)
        if keep > 0:
            for old in available_submissions(output_dir, self.rank)[:-keep]:
                shutil.rmtree(part_path(output_dir, self.rank, old), ignore_errors=True)
        return path

    @classmethod
    def read(cls, output_dir: Path, rank: int, submission: int) -> WorkerState:
        path = part_path(output_dir, rank, submission)
        state = load_state(path, "worker")
        if state["rank"] != rank or state["submission"] != submission:
            raise ValueError(f"{path} holds rank {state['rank']} submission {state['submission']}")
        return cls(
            rank,
            submission,
            int(state["local_step"]),
            state["optimizer"],
            state["stream"],
            state["rng"],
            state.get("encoder"),
        )

    def restore(self, optimizer: torch.optim.Optimizer, stream: TokenStream) -> None:
        """Load into the worker's optimizer and stream, and set this process's RNG (the encoder's
        residual is restored by ``restore_encoder`` once the worker's encoder exists)."""
        optimizer.load_state_dict(self.optimizer)
        stream.load_state_dict(self.stream)
        set_rng_state(self.rng)

    def restore_encoder(self, encoder: Any) -> None:
        """Give the worker's encoder its saved residual; a state saved without one (no error
        feedback, or a run that had none) leaves the encoder as it is."""
        if self.encoder is None:
            return
        load = getattr(encoder, "load_state_dict", None)
        if not callable(load):
            raise ValueError(
                f"rank {self.rank}'s state after submission {self.submission} holds an error-feedback "
                "residual, but this run's worker has no error feedback (set error_feedback as it was)"
            )
        load(self.encoder)


def _host_copy(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else copy.deepcopy(value)


class WorkerCheckpoints:
    """The worker side of the protocol: hold the state after the latest submission, write the one the
    server asks for."""

    def __init__(
        self,
        output_dir: Path,
        rank: int,
        keep: int,
        submissions: int = 0,
        keep_optimizer: bool = True,
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.keep_optimizer = keep_optimizer  # False when every round starts from a fresh AdamW
        self.enabled = enabled  # False when no checkpoint will ask (save_every = 0): nothing is copied
        self.rank = rank
        self.keep = 0 if keep <= 0 else max(2, keep + 1)  # 0: keep all, as prune_checkpoints
        self.submissions = submissions
        self.held: WorkerState | None = None
        self.written: list[int] = []
        self.encoder: Any = None  # the worker's Δ encoder (error feedback's residual is kept with it)

    @classmethod
    def for_run(cls, config: RecipeConfig, rank: int, submissions: int = 0) -> WorkerCheckpoints:
        """As the run's config says: as many states kept as checkpoints (one more: a checkpoint
        being written may need the newest), the AdamW moments only if rounds keep them, and nothing
        at all without periodic checkpoints."""
        t = config.train
        return cls(
            Path(t.output_dir),
            rank,
            t.keep_checkpoints,
            submissions,
            keep_optimizer=not t.reset_inner_optimizer,
            enabled=t.save_every > 0,
        )

    def snapshot(
        self, local_step: int, optimizer: torch.optim.Optimizer, stream: TokenStream
    ) -> WorkerState | None:
        """The state as it stands now, for the submission about to be sent: an overlapped worker
        gets its reply a round later, when its state has moved on, and hands this to
        ``after_submission`` then. None when no checkpoint will ask."""
        if not self.enabled:
            return None
        return WorkerState.take(
            self.rank,
            self.submissions + 1,
            local_step,
            optimizer,
            stream,
            with_moments=self.keep_optimizer,
            encoder=self.encoder,
        )

    def after_submission(
        self,
        local_step: int,
        optimizer: torch.optim.Optimizer,
        stream: TokenStream,
        stats: dict[str, float],
        state: WorkerState | None = None,
    ) -> None:
        """Count the submission and keep its state (``state``: taken by ``snapshot`` when it was
        sent; otherwise now); write what the reply asks for: this submission's state
        (``checkpoint_submission``: a checkpoint was taken at this arrival) and/or the previous
        one's (``checkpoint_previous``: one was taken while this worker computed its round)."""
        self.submissions += 1
        if not self.enabled:
            return
        previous = self.held
        if state is not None:
            self.held = dataclasses.replace(state, submission=self.submissions)
        else:
            self.held = WorkerState.take(
                self.rank,
                self.submissions,
                local_step,
                optimizer,
                stream,
                with_moments=self.keep_optimizer,
                encoder=self.encoder,
            )
        with sigterm_deferred():
            for key, candidate in (("checkpoint_submission", self.held), ("checkpoint_previous", previous)):
                if key not in stats:
                    continue
                wanted = int(stats[key])
                if candidate is None or candidate.submission != wanted:  # e.g. just rejoined: none
                    have = None if candidate is None else candidate.submission
                    logger.warning(
                        "rank %d: the server asked (%s) for the state after submission %d, this worker "
                        "holds %s; that checkpoint stays incomplete and a resume will not choose it",
                        self.rank, key, wanted, have,
                    )  # fmt: skip
                    continue
                candidate.write(self.output_dir, self.keep)
                self.written.append(wanted)


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """SIGTERM waits until the block is done, then takes its usual course (the handler in place
    before, or the default: the process ends).

    When one rank fails, torchrun's agent sends every other local rank SIGTERM (and SIGKILL 30 s
    later) before ``--max_restarts`` starts the group again: a worker that dies while it writes the
    state a checkpoint asked for leaves that checkpoint incomplete, and the restart cannot resume
    from it. Only in the main thread (where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if received:
            logger.warning("SIGTERM received while writing a worker state: taken now that it is written")
            signal.raise_signal(signal.SIGTERM)
