"""Upload checkpoint folders to one Hub model repo in the background, without ever stalling or failing
training and without touching the local checkpoint.

Each push submits one job to a single background worker (a daemon thread: see below) that makes sure the
repo (and branch) exist, then calls ``HfApi.upload_folder``. One job rather than ``create_repo`` and ``upload_folder`` futures side by side, so that a
failed ``create_repo`` (a Hub that is down) skips the upload instead of sending it into
``huggingface_hub``'s HTTP retries; the next push tries to create the repo again.

What the recipes rely on:

* ``push`` returns as soon as the folder is copied; anything that goes wrong afterwards is logged,
  recorded in ``history`` and counted in ``status``, never raised. A failed push is not retried by this
  class (``huggingface_hub`` already retries transient HTTP errors of an upload); the next checkpoint's
  push carries newer weights anyway.
* The local checkpoint is only read. ``push`` copies it into a private temporary directory (mode 0700)
  and writes the card there: a copy, not an upload straight from the folder, because the recipes prune
  old checkpoints right after pushing while the upload runs later.
* At most one upload in flight (the executor has one worker). A push still queued when a newer one
  arrives is dropped (state ``"superseded"``): the newer one overwrites the same files on the same branch.
* No token in logs, errors or uploaded cards: all pass through :func:`redact_secrets`.
* ``close(timeout)`` waits for the last upload up to ``timeout`` seconds, then reports what is unfinished.
  An upload still in flight keeps going while the process lives, and never holds it open: the worker
  is a daemon thread (``HfApi.run_as_future``'s executor is not: Python joins its thread at exit, so a
  hung Hub kept a finished run from exiting), and its staging copy is removed at exit.
* Every Hub request has an HTTP timeout (``http_timeout``, 60 s without a byte by default;
  ``huggingface_hub``'s client has none): a Hub that stops answering fails the push instead of
  blocking the worker forever. It is set on ``huggingface_hub``'s shared client, process-wide, before
  each upload; ``http_timeout=None`` leaves the client as it is.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import CommitInfo, HfApi, ModelCard, get_session
from huggingface_hub.utils import disable_progress_bars, get_token, validate_repo_id

logger = logging.getLogger(__name__)

HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{16,}")
PushState = Literal["queued", "running", "ok", "failed", "superseded"]


def redact_secrets(text: str, extra: Sequence[str | None] = ()) -> str:
    """Replace the current Hugging Face token, ``extra`` secrets and ``hf_...``-shaped tokens by ``***``,
    so a server error that quotes a request, or a command line, cannot leak a token into logs or cards."""
    try:
        current = get_token()
    except Exception:  # an OIDC exchange may fail: redaction must not
        current = None
    secrets = {s for s in (*extra, current) if isinstance(s, str) and len(s) >= 4}
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return HF_TOKEN_PATTERN.sub("hf_***", text)


DEFAULT_HTTP_TIMEOUT = 60.0
_STAGING_IN_FLIGHT: set[Path] = set()  # staging copies of unfinished pushes, removed at exit


@atexit.register
def _remove_abandoned_staging() -> None:
    for path in list(_STAGING_IN_FLIGHT):
        shutil.rmtree(path, ignore_errors=True)


class DaemonWorker:
    """Runs submitted calls one at a time, in order, on one daemon thread; a future can be cancelled
    until its call starts. Why not a ``ThreadPoolExecutor`` (what ``HfApi.run_as_future`` uses): the
    interpreter joins its threads at exit, so an upload to a hung Hub kept the process alive. The
    thread ends after ``IDLE_S`` seconds without work and is started again by the next ``submit``."""

    IDLE_S = 5.0

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Queue ``fn(*args)``; RuntimeError if no thread can be started (interpreter shutdown)."""
        future: Future[Any] = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._calls.put((future, fn, args))
        return future

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _run(self) -> None:
        while True:
            try:
                future, fn, args = self._calls.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:  # submit() starts a new thread if this one has gone
                    if self._calls.empty():
                        self._thread = None
                        return
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # the future carries it to whoever looks
                future.set_exception(err)


@dataclasses.dataclass
class PushRecord:
    """What became of one ``HubUploader.push``; ``error`` is already redacted."""

    index: int
    commit_message: str
    step: int | None
    state: PushState = "queued"
    error: str | None = None
    commit_url: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


@dataclasses.dataclass
class _Job:
    record: PushRecord
    staging: Path  # private temporary directory; the snapshot is its "files" subfolder
    future: Future[CommitInfo] | None = None


class HubUploader:
    """Push snapshots of checkpoint folders to ``repo_id`` (created on first use, ``exist_ok``), one
    commit per push on ``revision`` (a branch, created too) or ``main``. See the module docstring for
    the guarantees. ``progress_bars=False`` turns ``huggingface_hub``'s bars off process-wide so the
    background upload does not draw over the training loop's output. ``http_timeout``: seconds any
    Hub request may wait for the next byte (None: ``huggingface_hub``'s client as it is)."""

    def __init__(
        self,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        token: str | None = None,
        endpoint: str | None = None,
        progress_bars: bool = False,
        http_timeout: float | None = DEFAULT_HTTP_TIMEOUT,
    ) -> None:
        validate_repo_id(repo_id)  # raises HFValidationError, a ValueError, naming the rule broken
        if revision is not None and (not isinstance(revision, str) or not revision.strip()):
            raise ValueError(f"revision must be None or a non-empty branch name, got {revision!r}")
        if http_timeout is not None and not (isinstance(http_timeout, int | float) and http_timeout > 0):
            raise ValueError(f"http_timeout must be a number of seconds > 0 or None, got {http_timeout!r}")
        self.http_timeout = http_timeout
        self._worker = DaemonWorker(f"heloco-hub-{repo_id}")
        self.repo_id = repo_id
        self.private = bool(private)
        self.revision = revision
        self._token = token
        self._api = HfApi(endpoint=endpoint, token=token, library_name="heloco")
        if not progress_bars:
            disable_progress_bars()
        self._cond = threading.Condition(threading.RLock())
        self._records: list[PushRecord] = []
        self._queued: _Job | None = None  # submitted, not started: the one a newer push supersedes
        self._unfinished: list[_Job] = []
        self._closed = False
        self._repo_ready = False  # touched only on the executor's one thread
        self._remote_repo_id = repo_id

    def __repr__(self) -> str:  # never shows the token
        return f"HubUploader(repo_id={self.repo_id!r}, revision={self.revision!r}, endpoint={self._api.endpoint!r})"

    def push(
        self,
        folder: str | os.PathLike[str],
        commit_message: str,
        *,
        step: int | None = None,
        card: ModelCard | str | None = None,
        extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> int:
        """Copy ``folder`` (plus ``card`` as README.md and ``extra_files``, repo path → local file) and
        queue its upload; returns the push's index in :attr:`history`. Bad arguments raise here; a
        failure afterwards (even the copy, e.g. a full disk) is recorded and logged instead."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {str(folder)!r} is not a directory")
        if not isinstance(commit_message, str) or not commit_message.strip():
            raise ValueError(f"commit_message must be a non-empty str, got {commit_message!r}")
        extras = {path: Path(source) for path, source in (extra_files or {}).items()}
        for path, source in extras.items():
            if Path(path).is_absolute() or ".." in Path(path).parts:
                raise ValueError(f"extra_files key must be a relative path inside the repo, got {path!r}")
            if not source.is_file():
                raise FileNotFoundError(f"extra_files[{path!r}]: {str(source)!r} is not a file")
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed; create a new HubUploader to push again")
            record = PushRecord(index=len(self._records), commit_message=commit_message, step=step)
            self._records.append(record)

        staging = Path(tempfile.mkdtemp(prefix="heloco-hub-"))  # mode 0700: the copy below stays private
        files = staging / "files"
        try:
            shutil.copytree(folder, files, ignore=shutil.ignore_patterns(".git"))
            if card is not None:
                (files / "README.md").write_text(redact_secrets(str(card), [self._token]), encoding="utf-8")
            for path, source in extras.items():
                (files / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, files / path)
        except Exception as err:
            shutil.rmtree(staging, ignore_errors=True)
            with self._cond:
                record.state, record.error = (
                    "failed",
                    self._scrub(f"copy failed: {type(err).__name__}: {err}"),
                )
            logger.error("Hub push %r of %s not queued: %s", commit_message, folder, record.error)
            return record.index

        job = _Job(record, staging)
        with self._cond:
            old = self._queued
            if old is not None and old.future is not None and old.future.cancel():
                old.record.state = "superseded"
                logger.info(
                    "Hub push %r superseded by %r before it started",
                    old.record.commit_message,
                    commit_message,
                )
            try:
                job.future = self._worker.submit(self._upload, job)
            except RuntimeError as err:  # no new thread once the interpreter shuts down
                shutil.rmtree(staging, ignore_errors=True)
                record.state, record.error = "failed", self._scrub(f"not queued: {err}")
                logger.error("Hub push %r not queued: %s", commit_message, record.error)
                return record.index
            self._unfinished.append(job)
            _STAGING_IN_FLIGHT.add(staging)
            self._queued = job
            job.future.add_done_callback(functools.partial(self._finished, job))
        logger.info("Hub push %r of %s queued for %s", commit_message, folder, self.repo_id)
        return record.index

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every push has finished (uploaded or failed); False if ``timeout`` came first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._unfinished, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new pushes and wait up to ``timeout`` seconds for the pending ones. At the timeout a
        queued push is dropped (recorded as failed) and one in flight is reported (left ``"running"``,
        it finishes in the background). True if everything finished."""
        with self._cond:
            self._closed = True
        if self.wait(timeout):
            return True
        with self._cond:
            for job in list(self._unfinished):
                if job.future is not None and job.future.cancel():
                    job.record.state, job.record.error = "failed", "not uploaded: closed before it started"
                    logger.error(
                        "Hub push %r not uploaded: closed before it started", job.record.commit_message
                    )
                else:
                    logger.warning(
                        "Hub push %r still uploading after %s s; it goes on in the background",
                        job.record.commit_message, timeout,
                    )  # fmt: skip
        return False

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per push, oldest first: index, commit_message, step, state, ok, error, commit_url."""
        with self._cond:
            return [r.as_dict() for r in self._records]

    @property
    def status(self) -> dict[str, Any]:
        """Pushes per state and the latest successful one, for logs and summaries."""
        with self._cond:
            counts = collections.Counter(r.state for r in self._records)
            last_ok = next((r.as_dict() for r in reversed(self._records) if r.ok), None)
            states = ("queued", "running", "ok", "failed", "superseded")
            return {
                "repo_id": self._remote_repo_id,
                "revision": self.revision,
                **{s: counts[s] for s in states},
                "last_ok": last_ok,
            }

    # -------------------------------------------------------------------------- on the executor's thread

    def _upload(self, job: _Job) -> CommitInfo:
        with self._cond:
            job.record.state = "running"
            if self._queued is job:
                self._queued = None
        if self.http_timeout is not None:
            session = get_session()  # huggingface_hub's shared client, re-created after a fork
            if session.timeout.read != self.http_timeout:
                session.timeout = self.http_timeout
        if not self._repo_ready:
            url = self._api.create_repo(self.repo_id, exist_ok=True, private=self.private, repo_type="model")
            self._remote_repo_id = url.repo_id or self.repo_id  # a bare name gets the user's namespace
            if self.revision is not None:
                self._api.create_branch(self._remote_repo_id, branch=self.revision, exist_ok=True)
            self._repo_ready = True
        return self._api.upload_folder(
            repo_id=self._remote_repo_id,
            folder_path=job.staging / "files",
            commit_message=job.record.commit_message,
            revision=self.revision,
            repo_type="model",
        )

    def _finished(self, job: _Job, future: Future[CommitInfo]) -> None:
        """Done callback (on the executor's thread, or the canceller's): record, log, clean up. The log
        line is written before waiters are woken, so whoever returns from ``wait`` can already read it."""
        shutil.rmtree(job.staging, ignore_errors=True)
        _STAGING_IN_FLIGHT.discard(job.staging)
        record = job.record
        error = None if future.cancelled() else future.exception()
        with self._cond:
            # A cancelled push was recorded by whoever cancelled it (a newer push, or close).
            if not future.cancelled():
                self._record_outcome(record, future, error)
            if self._queued is job:
                self._queued = None
            self._unfinished.remove(job)
            self._cond.notify_all()

    def _record_outcome(
        self, record: PushRecord, future: Future[CommitInfo], error: BaseException | None
    ) -> None:
        """Record and log an upload that ran (under the lock, before waiters are woken)."""
        if error is None:
            record.state, record.commit_url = "ok", str(future.result().commit_url)
            logger.info("Hub push %r done: %s", record.commit_message, record.commit_url)
            return
        record.state, record.error = "failed", self._scrub(f"{type(error).__name__}: {error}")
        logger.error(
            "Hub push %r failed; the local checkpoint is untouched, the next push tries again: %s",
            record.commit_message, record.error,
        )  # fmt: skip

    def _scrub(self, text: str) -> str:
        return redact_secrets(text, [self._token])
