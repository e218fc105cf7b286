"""The run's metrics log as an Accelerate tracker, so one ``accelerator.log`` call writes
``metrics.jsonl`` and feeds TensorBoard / wandb / trackio alike.

``JsonlTracker`` is the file: one JSON line per record, flushed at once, cut back on resume.
``MetricsLog`` is what the run scripts call: it registers the tracker on the accelerator and hands it
the full record (strings included) through ``log_kwargs`` while the other trackers receive only the
numeric values, prefixed ``"{event}/{key}"``.

Wiring: Accelerate feeds ``accelerator.trackers``, which ``init_trackers`` only appends to (it never
clears it), so ``MetricsLog`` appends its tracker there itself and may be created before or after
``init_trackers``. ``init_trackers`` then calls the tracker's ``start`` and
``store_init_configuration``, both no-ops here: the file holds records only, its bytes equal those
of the pre-tracker log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker


def rounds_recorded(output_dir: Path) -> bool:
    """Whether a run in ``output_dir`` got past its first round: a checkpoint, or an arrival in one
    of its metrics logs (``metrics.jsonl``, distributed ranks' ``metrics-rank<k>.jsonl``)."""
    output_dir = Path(output_dir)
    if any(output_dir.glob("checkpoint-*")):
        return True
    for path in output_dir.glob("metrics*.jsonl"):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("event") == "arrival":
                        return True
                except (json.JSONDecodeError, AttributeError):
                    continue  # a line cut short by the failure
    return False


class JsonlTracker(GeneralTracker):
    """Append-only JSONL file as an Accelerate tracker. On resume (``keep_lines`` given) the file is
    cut back to that many lines, the count stored in the checkpoint, so a resumed run's log equals
    an uninterrupted one; without ``keep_lines`` it starts empty."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True  # only rank 0 creates one; accelerator.log runs on the main process only

    def __init__(self, path: Path, keep_lines: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        lines = self.path.read_text().splitlines() if (keep_lines is not None and self.path.exists()) else []
        if keep_lines is not None and len(lines) < keep_lines:
            raise RuntimeError(f"{self.path} has {len(lines)} lines, the checkpoint expects {keep_lines}")
        self.lines = 0
        with open(self.path, "w") as f:
            for line in lines[: keep_lines or 0]:
                f.write(line + "\n")
                self.lines += 1
        self._file = open(self.path, "a")  # noqa: SIM115 - held open for the whole run

    @property
    def tracker(self) -> IO[str]:
        """The open file (what ``accelerator.get_tracker("jsonl", unwrap=True)`` returns)."""
        return self._file

    def store_init_configuration(self, values: dict) -> None:
        """Nothing: the configuration lives in the run's config.json, the file holds records only."""

    def log(
        self, values: dict, step: int | None = None, record: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """One line: ``record`` verbatim when given (full records, strings included, arrive this way
        through ``log_kwargs``), else the logged values with their step."""
        line = record if record is not None else {"step": step, **values}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self.lines += 1

    def finish(self) -> None:
        """Close the file; safe to call twice (``MetricsLog.close`` and ``end_training``)."""
        self._file.close()


class MetricsLog:
    """Arrivals and evals of a run: ``metrics.jsonl`` plus Accelerate's trackers, from one call.

    Create it on the main process only (rank 0), the one where ``accelerator.log`` runs."""

    def __init__(self, path: Path, accelerator: Accelerator, keep_lines: int | None = None) -> None:
        if not accelerator.is_main_process:
            raise RuntimeError("MetricsLog belongs to the main process: accelerator.log is a no-op elsewhere")
        self.path = path
        self.accelerator = accelerator
        self.tracker = JsonlTracker(path, keep_lines=keep_lines)
        accelerator.trackers.append(self.tracker)

    @property
    def lines(self) -> int:
        """Lines in the file (kept ones included): what a checkpoint stores for a later resume."""
        return self.tracker.lines

    def write(self, record: dict[str, Any], step: int) -> None:
        numeric = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self.accelerator.log(
            {f"{record['event']}/{k}": v for k, v in numeric.items()},
            step=step,
            log_kwargs={JsonlTracker.name: {"record": record}},
        )

    def close(self) -> None:
        """Close the file and unregister the tracker, so later ``accelerator.log`` calls skip it."""
        self.tracker.finish()
        if self.tracker in self.accelerator.trackers:
            self.accelerator.trackers.remove(self.tracker)
