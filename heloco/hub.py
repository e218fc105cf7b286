"""Push checkpoints and their model card to the Hugging Face Hub without ever stalling or losing training.

Two pieces:

* :func:`render_model_card` turns a :class:`ModelCardInfo` (filled by the training recipe) into a
  ``huggingface_hub.ModelCard``: YAML metadata the Hub indexes, and a body with the method, every
  hyperparameter, the workers, the data partition, the tokens seen and the per-language validation loss.
* :class:`HubPusher` uploads checkpoint folders in a background thread. ``push`` copies the folder into
  a private staging directory (so the trainer may rotate or delete its checkpoint right away) and
  returns at once; failures are logged and retried with exponential backoff, then given up. Nothing
  ever raises into the training loop because the Hub is slow or down, and the local checkpoint is only
  read, never modified.

The Hub endpoint comes from ``endpoint=``, else the ``HF_ENDPOINT`` environment variable, else
``huggingface_hub``'s default. The token comes from ``token=``, else ``HF_TOKEN`` or the token stored by
``hf auth login`` (resolved by ``huggingface_hub`` per request). The token is never logged: every error
message this module logs or records is scrubbed of it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from huggingface_hub import HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.utils import filter_repo_objects, get_token, validate_repo_id

logger = logging.getLogger(__name__)

__all__ = ["HubPusher", "ModelCardInfo", "PushRecord", "redact_secrets", "render_model_card"]

# Papers the card cites for the training method (arXiv ids).
_REFERENCES = (
    ("DiLoCo, Douillard et al. 2023", "2311.08105"),
    ("Asynchronous Local-SGD with Delayed Nesterov and DyLU, Liu et al. 2024", "2401.09135"),
    ("HeLoCo, Al Asif et al. 2026", "2606.00271"),
)
_HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{16,}")
_MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?[^)]*\)")


# ---------------------------------------------------------------------------------------------------- card


@dataclasses.dataclass(kw_only=True)
class ModelCardInfo:
    """What the model card reports about one training run. The training recipe fills it.

    Attributes:
        model_name: title of the card.
        method: outer method as the recipe names it (e.g. ``"heloco"``, ``"diloco"``, ``"dn"``).
        hyperparameters: every hyperparameter of the run, name → value, or a dataclass instance holding
            them. Nested mappings are flattened to dotted names (``{"inner": {"lr": 4e-4}}`` → ``inner.lr``);
            the order is kept.
        num_workers: K, the number of workers.
        worker_speeds: speed of each worker in inner steps per second, ``len == num_workers``.
        partition: how documents were split among workers, e.g. ``"dirichlet(alpha=0.1)"``.
        language_histogram: training tokens per worker and language: ``{worker_id: {language: tokens}}``
            with worker ids ``0..K-1`` (int, or their decimal strings as JSON gives them).
        tokens_seen: training tokens processed by all workers together.
        validation_loss: mean validation loss per language, ``{language: loss}``.
        command: the command line that produced the checkpoint (secrets in it are redacted).
        datasets: Hub dataset ids the data came from (YAML ``datasets``).
        languages: language codes for the YAML ``language`` list; default: every language in the
            histogram or the validation losses, sorted.
        license: license identifier for the YAML ``license`` field.
        library_name: library that loads the checkpoint (YAML ``library_name``).
        tags: extra tags; ``heloco``, ``diloco`` and the method are always added.
        loss_plot: path *inside the pushed repo* of a loss-curve image (e.g. ``"loss.png"``) to embed;
            the image itself must be in the pushed folder or passed to ``HubPusher.push(extra_files=)``.
        step: outer step (global model version) of this checkpoint, if known.
    """

    model_name: str
    method: str
    hyperparameters: Mapping[str, Any]
    num_workers: int
    worker_speeds: Sequence[float]
    partition: str
    language_histogram: Mapping[int | str, Mapping[str, int]]
    tokens_seen: int
    validation_loss: Mapping[str, float]
    command: str
    datasets: Sequence[str] = ()
    languages: Sequence[str] | None = None
    license: str = "apache-2.0"
    library_name: str = "transformers"
    tags: Sequence[str] = ("llama",)
    loss_plot: str | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        for name in ("model_name", "method", "partition", "license", "library_name"):
            _require_text(name, getattr(self, name))
        if not isinstance(self.command, str):
            raise ValueError(f"ModelCardInfo.command must be a str, got {type(self.command).__name__}")
        if dataclasses.is_dataclass(self.hyperparameters) and not isinstance(self.hyperparameters, type):
            self.hyperparameters = dataclasses.asdict(self.hyperparameters)  # e.g. the recipe's config object
        if not isinstance(self.hyperparameters, Mapping):
            raise ValueError(
                "ModelCardInfo.hyperparameters must be a mapping of name → value (or a dataclass)"
            )
        if (
            isinstance(self.num_workers, bool)
            or not isinstance(self.num_workers, int)
            or self.num_workers < 1
        ):
            raise ValueError(f"ModelCardInfo.num_workers must be an int >= 1, got {self.num_workers!r}")
        speeds = [float(s) for s in self.worker_speeds]
        if len(speeds) != self.num_workers:
            raise ValueError(
                f"ModelCardInfo.worker_speeds must have one entry per worker ({self.num_workers}), got {len(speeds)}"
            )
        if not all(math.isfinite(s) and s > 0 for s in speeds):
            raise ValueError(f"ModelCardInfo.worker_speeds must be finite and > 0 steps/s, got {speeds}")
        self.worker_speeds = tuple(speeds)
        self.language_histogram = self._checked_histogram()
        if (
            isinstance(self.tokens_seen, bool)
            or not isinstance(self.tokens_seen, int)
            or self.tokens_seen < 0
        ):
            raise ValueError(f"ModelCardInfo.tokens_seen must be an int >= 0, got {self.tokens_seen!r}")
        if not isinstance(self.validation_loss, Mapping):
            raise ValueError("ModelCardInfo.validation_loss must be a mapping of language → loss")
        self.validation_loss = {
            _require_text("validation_loss language", k): float(v) for k, v in self.validation_loss.items()
        }
        if isinstance(self.datasets, str) or isinstance(self.tags, str):
            raise ValueError("ModelCardInfo.datasets and .tags must be sequences of str, not a single str")
        for value in (*self.datasets, *self.tags):
            _require_text("datasets/tags entry", value)
        if self.languages is None:
            found = {lang for row in self.language_histogram.values() for lang in row} | set(
                self.validation_loss
            )
            self.languages = sorted(found)
        elif isinstance(self.languages, str):
            raise ValueError("ModelCardInfo.languages must be a sequence of language codes, not a single str")
        else:
            self.languages = [_require_text("languages entry", lang) for lang in self.languages]
        if self.loss_plot is not None:
            self.loss_plot = _check_repo_path("ModelCardInfo.loss_plot", self.loss_plot)
        if self.step is not None and (
            isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0
        ):
            raise ValueError(f"ModelCardInfo.step must be None or an int >= 0, got {self.step!r}")

    def _checked_histogram(self) -> dict[int, dict[str, int]]:
        if not isinstance(self.language_histogram, Mapping):
            raise ValueError(
                "ModelCardInfo.language_histogram must be a mapping {worker_id: {language: tokens}}"
            )
        out: dict[int, dict[str, int]] = {}
        for key, row in self.language_histogram.items():
            try:
                worker = int(key)
            except (TypeError, ValueError):
                raise ValueError(
                    f"ModelCardInfo.language_histogram keys must be worker ids, got {key!r}"
                ) from None
            if not isinstance(row, Mapping):
                raise ValueError(f"ModelCardInfo.language_histogram[{key!r}] must map language → tokens")
            counts = {}
            for lang, tokens in row.items():
                _require_text("language_histogram language", lang)
                if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                    raise ValueError(
                        f"ModelCardInfo.language_histogram[{key!r}][{lang!r}] must be an int >= 0, got {tokens!r}"
                    )
                counts[lang] = tokens
            out[worker] = counts
        if sorted(out) != list(range(self.num_workers)):
            raise ValueError(
                f"ModelCardInfo.language_histogram must have exactly the workers 0..{self.num_workers - 1}, "
                f"got {sorted(out)}"
            )
        return dict(sorted(out.items()))


def render_model_card(info: ModelCardInfo | Mapping[str, Any]) -> ModelCard:
    """Render the model card (YAML metadata + Markdown body) of a checkpoint.

    ``info`` is a :class:`ModelCardInfo` or a mapping with its fields. Any Hugging Face token found in the
    rendered text (the current one, or anything shaped like ``hf_...``) is replaced by ``***``.
    """
    if isinstance(info, Mapping):
        accepted = {f.name for f in dataclasses.fields(ModelCardInfo)}
        unknown = sorted(set(info) - accepted)
        if unknown:
            raise ValueError(f"unknown ModelCardInfo fields {unknown}; accepted: {sorted(accepted)}")
        info = ModelCardInfo(**info)
    elif not isinstance(info, ModelCardInfo):
        raise ValueError(f"info must be a ModelCardInfo or a mapping, got {type(info).__name__}")

    tags = _unique(["heloco", "diloco", _slug(info.method), *info.tags])
    data = ModelCardData(
        language=list(info.languages),
        license=info.license,
        library_name=info.library_name,
        tags=tags,
        datasets=list(info.datasets) or None,
        pipeline_tag="text-generation",
    )
    content = f"---\n{data.to_yaml()}\n---\n\n{_card_body(info)}"
    return ModelCard(redact_secrets(content))


def _card_body(info: ModelCardInfo) -> str:
    langs = sorted({lang for row in info.language_histogram.values() for lang in row})
    fastest = max(info.worker_speeds)
    checkpoint = f" at outer step {info.step}" if info.step is not None else ""
    lines = [
        f"# {info.model_name}",
        "",
        f"Checkpoint{checkpoint} of a language model trained with heloco: "
        "asynchronous, low-communication (DiLoCo-style) training of one model on workers of different "
        "speeds that each see different data.",
        "",
        "## Method",
        "",
        f"- Outer method: `{info.method}`",
        f"- Workers (K): {info.num_workers}",
        f"- Tokens seen: {info.tokens_seen:,}",
        "",
        "References: " + "; ".join(f"{title} (arXiv {arxiv})" for title, arxiv in _REFERENCES) + ".",
        "",
        "### Hyperparameters",
        "",
        *_table(["hyperparameter", "value"], [[k, str(v)] for k, v in _flatten(info.hyperparameters)]),
        "",
        "## Workers",
        "",
        *_table(
            ["worker", "speed (steps/s)", "relative speed"],
            [[str(i), f"{s:g}", f"{s / fastest:.2f}"] for i, s in enumerate(info.worker_speeds)],
        ),
        "",
        "## Data",
        "",
        f"- Datasets: {', '.join(info.datasets) if info.datasets else 'local data'}",
        f"- Partition across workers: `{info.partition}`",
        "",
        "Training tokens per worker and language:",
        "",
        *_table(
            ["worker", *langs, "total"],
            [
                [str(w), *(f"{row.get(lang, 0):,}" for lang in langs), f"{sum(row.values()):,}"]
                for w, row in info.language_histogram.items()
            ]
            + [
                [
                    "total",
                    *(f"{sum(r.get(lang, 0) for r in info.language_histogram.values()):,}" for lang in langs),
                    f"{sum(sum(r.values()) for r in info.language_histogram.values()):,}",
                ]
            ],
        ),
        "",
        "## Evaluation",
        "",
        "Validation loss (mean token cross-entropy, nats) per language:",
        "",
        *_table(
            ["language", "validation loss", "perplexity"],
            [[lang, f"{loss:.4f}", _perplexity(loss)] for lang, loss in sorted(info.validation_loss.items())],
        ),
        "",
    ]
    if info.loss_plot is not None:
        lines += ["## Training loss", "", f"![Training loss]({info.loss_plot})", ""]
    fence = "````" if "```" in info.command else "```"
    lines += ["## Reproduce", "", f"{fence}bash", info.command, fence, ""]
    return "\n".join(lines)


def redact_secrets(text: str, extra: Sequence[str | None] = ()) -> str:
    """Replace the current Hugging Face token, ``extra`` secrets and ``hf_...``-shaped tokens by ``***``."""
    secrets = {s for s in (*extra, _current_token()) if isinstance(s, str) and len(s) >= 4}
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _HF_TOKEN_PATTERN.sub("hf_***", text)


def _current_token() -> str | None:
    try:
        return get_token()
    except Exception:  # an OIDC exchange may fail: redaction must not
        return None


def _require_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    return value


def _check_repo_path(name: str, path: str) -> str:
    """A relative POSIX path inside a repo, without ``..``."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{name} must be a non-empty relative path inside the repo, got {path!r}")
    posix = PurePosixPath(path.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts or str(posix) in ("", "."):
        raise ValueError(f"{name} must be a relative path inside the repo without '..', got {path!r}")
    return str(posix)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += _flatten(value, prefix=f"{name}.")
        else:
            out.append((name, value))
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        escaped = (str(c).replace("|", "\\|").replace("\n", " ") for c in cells)
        return "| " + " | ".join(escaped) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def _perplexity(loss: float) -> str:
    if not math.isfinite(loss):
        return "n/a"
    return f"{math.exp(loss):.2f}" if loss < 700 else "inf"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+-]+", "-", text.lower()).strip("-") or "method"


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------------- pusher

PushState = Literal["queued", "running", "ok", "failed", "superseded"]


@dataclasses.dataclass
class PushRecord:
    """What became of one ``HubPusher.push`` call. ``error`` never contains the token."""

    index: int
    commit_message: str
    step: int | None
    state: PushState = "queued"
    attempts: int = 0
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
    staging: Path


class HubPusher:
    """Upload checkpoint folders to one Hub model repo from a background thread.

    ``push`` snapshots the folder (a full copy into a private temporary directory, so later changes to the
    local checkpoint, or its deletion, cannot affect the upload) and returns immediately. One daemon thread
    uploads snapshots in order with ``upload_folder`` (one commit each). The repo is created on the first
    upload (``exist_ok=True``), and the ``revision`` branch too when one is given.

    A failed upload is logged and retried ``max_retries`` times, sleeping ``retry_backoff * 2**(n-1)``
    seconds before retry ``n``; after that it is logged as failed and dropped. Errors never propagate to the
    caller, and the local checkpoint is only ever read.

    Superseding (``supersede=True``, the default): when a new push arrives while older ones are still
    queued (not yet started), the queued ones are dropped (state ``"superseded"``, snapshot deleted),
    because the newer snapshot overwrites the same files on the same branch anyway. An upload already in
    progress always completes. This bounds staging disk use to two snapshots and keeps the Hub close to
    the newest checkpoint when uploads are slower than checkpointing. With ``supersede=False`` every push
    becomes its own commit.

    ``progress_bars=False`` (default) turns off ``huggingface_hub``'s progress bars process-wide so the
    background upload does not draw over the training loop's own output.

    End of training: call ``close(timeout=...)`` (the context manager calls ``close()`` without one).
    ``huggingface_hub`` sets no HTTP timeout, so a Hub that accepts connections but never answers would
    otherwise keep ``wait()``/``close()`` blocked; with a timeout, unfinished pushes are recorded as failed.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        token: str | None = None,
        endpoint: str | None = None,
        max_retries: int = 3,
        retry_backoff: float = 2.0,
        supersede: bool = True,
        progress_bars: bool = False,
    ) -> None:
        validate_repo_id(repo_id)  # raises HFValidationError, a ValueError, naming the rule broken
        if revision is not None and (not isinstance(revision, str) or not revision.strip()):
            raise ValueError(f"revision must be None or a non-empty branch name, got {revision!r}")
        if token is not None and not isinstance(token, str):
            raise ValueError("token must be None (use HF_TOKEN or the stored login) or a str")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if (
            not isinstance(retry_backoff, (int, float))
            or not math.isfinite(retry_backoff)
            or retry_backoff < 0
        ):
            raise ValueError(f"retry_backoff must be a finite number of seconds >= 0, got {retry_backoff!r}")
        self.repo_id = repo_id
        self.private = bool(private)
        self.revision = revision
        self.max_retries = max_retries
        self.retry_backoff = float(retry_backoff)
        self.supersede = supersede
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self._token = token
        self._api = HfApi(endpoint=self.endpoint, token=token, library_name="heloco")
        if not progress_bars:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()

        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._records: list[PushRecord] = []
        self._running: _Job | None = None
        self._closed = False
        self._stop = False
        self._cancel = threading.Event()  # set by close() on timeout: no more retries
        self._repo_ready = False
        self._remote_repo_id = repo_id
        self._staging_root: Path | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"HubPusher(repo_id={self.repo_id!r}, revision={self.revision!r}, endpoint={self.endpoint!r})"

    def __enter__(self) -> HubPusher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ public API

    def push(
        self,
        folder: str | os.PathLike[str],
        commit_message: str,
        *,
        step: int | None = None,
        card: ModelCard | str | None = None,
        extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
        allow_patterns: Sequence[str] | str | None = None,
        ignore_patterns: Sequence[str] | str | None = None,
    ) -> int:
        """Snapshot ``folder`` and queue its upload; returns the push's index in :attr:`history`.

        ``card`` becomes the repo's README.md (in the snapshot only). ``extra_files`` maps paths in the
        repo to local files added to the snapshot (e.g. ``{"loss.png": plot}``). ``allow_patterns`` /
        ``ignore_patterns`` (fnmatch, on paths relative to ``folder``) select what is copied and uploaded.
        Bad arguments raise here; anything that goes wrong afterwards is logged and recorded instead.
        """
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
        if not folder.is_dir():
            raise ValueError(f"folder must be a directory, got the file {str(folder)!r}")
        if not isinstance(commit_message, str) or not commit_message.strip():
            raise ValueError(f"commit_message must be a non-empty str, got {commit_message!r}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ValueError(f"step must be None or an int >= 0, got {step!r}")
        if card is not None and not isinstance(card, (ModelCard, str)):
            raise ValueError(
                f"card must be a huggingface_hub.ModelCard, a str or None, got {type(card).__name__}"
            )
        extras: dict[str, Path] = {}
        for path_in_repo, source in (extra_files or {}).items():
            extras[_check_repo_path("extra_files key", path_in_repo)] = Path(source)
            if not Path(source).is_file():
                raise FileNotFoundError(f"extra_files[{path_in_repo!r}]: {str(source)!r} is not a file")

        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed; create a new HubPusher to push again")
            record = PushRecord(index=len(self._records), commit_message=commit_message, step=step)
            self._records.append(record)
            if self._staging_root is None:
                self._staging_root = Path(tempfile.mkdtemp(prefix="heloco-hub-"))  # mode 0700
            staging = self._staging_root / f"{record.index:06d}"

        try:
            _snapshot(folder, staging, allow_patterns, ignore_patterns)
            if card is not None:
                (staging / "README.md").write_text(str(card), encoding="utf-8")
            for path_in_repo, source in extras.items():
                (staging / path_in_repo).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, staging / path_in_repo)
            _warn_missing_images(staging)
        except Exception as err:  # e.g. disk full: record and log, never raise into training
            shutil.rmtree(staging, ignore_errors=True)
            with self._cond:
                record.state, record.error = (
                    "failed",
                    self._scrub(f"snapshot failed: {type(err).__name__}: {err}"),
                )
                self._cond.notify_all()
            logger.error("Hub push %r of %s not queued: %s", commit_message, folder, record.error)
            return record.index

        superseded: list[_Job] = []
        with self._cond:
            while self.supersede and self._queue:
                superseded.append(self._queue.popleft())
                superseded[-1].record.state = "superseded"
            self._queue.append(_Job(record, staging))
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="heloco-hub-pusher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        for old in superseded:
            shutil.rmtree(old.staging, ignore_errors=True)
            logger.info(
                "Hub push %r superseded by %r before it started", old.record.commit_message, commit_message
            )
        logger.info("Hub push %r of %s queued for %s", commit_message, folder, self.repo_id)
        return record.index

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued push has finished (succeeded or given up). False if ``timeout`` hit first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._running is None, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish queued pushes (up to ``timeout`` seconds), stop the thread, delete the staging copies.

        Pushes still queued at the timeout are recorded and logged as failed; an upload in flight is
        allowed to finish in the background but is not retried. Returns True if everything finished.
        """
        with self._cond:
            self._closed = True
        drained = self.wait(timeout)
        with self._cond:
            for job in self._queue:
                job.record.state, job.record.error = (
                    "failed",
                    "not uploaded: HubPusher closed before it started",
                )
                shutil.rmtree(job.staging, ignore_errors=True)
                logger.error("Hub push %r not uploaded: closed before it started", job.record.commit_message)
            self._queue.clear()
            self._stop = True
            self._cond.notify_all()
        if not drained:
            self._cancel.set()
        if self._thread is not None:
            self._thread.join(timeout=None if drained else 0.1)
        if (self._thread is None or not self._thread.is_alive()) and self._staging_root is not None:
            shutil.rmtree(self._staging_root, ignore_errors=True)
        return drained

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per push, oldest first: index, commit_message, step, state, ok, attempts, error, commit_url."""
        with self._cond:
            return [r.as_dict() for r in self._records]

    @property
    def status(self) -> dict[str, Any]:
        """Counts per state and the latest successful push, for the recipe's logs."""
        with self._cond:
            counts = collections.Counter(r.state for r in self._records)
            last_ok = next((r for r in reversed(self._records) if r.ok), None)
            return {
                "repo_id": self._remote_repo_id,
                "revision": self.revision,
                **{
                    state: counts.get(state, 0)
                    for state in ("queued", "running", "ok", "failed", "superseded")
                },
                "last_ok": last_ok.as_dict() if last_ok else None,
            }

    # ------------------------------------------------------------------------------------------ worker

    def _worker(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop)
                if not self._queue:
                    break
                job = self._queue.popleft()
                self._running = job
                job.record.state = "running"
            try:
                self._upload_with_retries(job)
            except BaseException as err:  # a bug here must still leave a record, and not kill the queue
                with self._cond:
                    job.record.state, job.record.error = "failed", self._scrub(f"{type(err).__name__}: {err}")
                logger.error(
                    "Hub push %r failed unexpectedly: %s", job.record.commit_message, job.record.error
                )
            finally:
                shutil.rmtree(job.staging, ignore_errors=True)
                with self._cond:
                    self._running = None
                    self._cond.notify_all()
        if self._closed and self._staging_root is not None:
            shutil.rmtree(self._staging_root, ignore_errors=True)

    def _upload_with_retries(self, job: _Job) -> None:
        record = job.record
        total = self.max_retries + 1
        for attempt in range(1, total + 1):
            with self._cond:
                record.attempts = attempt
            try:
                self._ensure_repo()
                info = self._api.upload_folder(
                    repo_id=self._remote_repo_id,
                    folder_path=job.staging,
                    commit_message=record.commit_message,
                    revision=self.revision,
                    repo_type="model",
                )
            except Exception as err:
                error = self._scrub(f"{type(err).__name__}: {err}")
                with self._cond:
                    record.error = error
                if attempt < total and not self._cancel.is_set():
                    delay = self.retry_backoff * 2 ** (attempt - 1)
                    logger.warning(
                        "Hub push %r failed (attempt %d/%d), retrying in %.3g s: %s",
                        record.commit_message, attempt, total, delay, error,
                    )  # fmt: skip
                    if self._cancel.wait(delay):
                        break
                    continue
                break
            else:
                with self._cond:
                    record.state, record.error, record.commit_url = "ok", None, str(info.commit_url)
                logger.info("Hub push %r done: %s", record.commit_message, info.commit_url)
                return
        with self._cond:
            record.state = "failed"
        logger.error(
            "Hub push %r gave up after %d attempt(s); the local checkpoint is untouched. Last error: %s",
            record.commit_message, record.attempts, record.error,
        )  # fmt: skip

    def _ensure_repo(self) -> None:
        if self._repo_ready:
            return
        url = self._api.create_repo(self.repo_id, exist_ok=True, private=self.private, repo_type="model")
        self._remote_repo_id = url.repo_id or self.repo_id  # a bare name gets the user's namespace
        if self.revision is not None:
            self._api.create_branch(
                self._remote_repo_id, branch=self.revision, exist_ok=True, repo_type="model"
            )
        self._repo_ready = True

    def _scrub(self, text: str) -> str:
        return redact_secrets(text, extra=[self._token])


def _snapshot(
    folder: Path,
    staging: Path,
    allow_patterns: Sequence[str] | str | None,
    ignore_patterns: Sequence[str] | str | None,
) -> None:
    """Copy the selected files of ``folder`` into ``staging`` (following symlinks, keeping the tree)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        files += [(Path(root) / n).relative_to(folder).as_posix() for n in sorted(names)]
    selected = filter_repo_objects(
        files,
        allow_patterns=list(allow_patterns) if isinstance(allow_patterns, (list, tuple)) else allow_patterns,
        ignore_patterns=list(ignore_patterns)
        if isinstance(ignore_patterns, (list, tuple))
        else ignore_patterns,
    )
    staging.mkdir(parents=True)
    for rel in selected:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / rel, target)


def _warn_missing_images(staging: Path) -> None:
    """Log a warning for each relative image the README embeds that the snapshot does not contain."""
    readme = staging / "README.md"
    if not readme.is_file():
        return
    for link in _MARKDOWN_IMAGE.findall(readme.read_text(encoding="utf-8")):
        if "://" in link or link.startswith(("/", "#", "data:")):
            continue
        if not (staging / link).is_file():
            logger.warning("model card embeds %r but the pushed folder has no such file", link)
