"""The per-rank JSONL files, and rank 0's metrics log shared between its threads."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recipes.tracking import MetricsLog


class JsonLines:
    """A rank's own append-only JSONL file (no trackers: those belong to rank 0's metrics.jsonl)."""

    def __init__(self, path: Path, fresh: bool) -> None:
        if fresh:
            path.write_text("")
        # Append mode even for a fresh file: a restarted worker may write to it while the old one
        # still runs, and O_APPEND keeps their lines whole.
        self._file = open(path, "a")  # noqa: SIM115 - held open for the whole run

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class LockedLog:
    """``MetricsLog`` shared by the server threads and the evaluation thread."""

    def __init__(self, log: MetricsLog) -> None:
        self.log = log
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any], step: int) -> None:
        with self._lock:
            self.log.write(record, step=step)

    @property
    def lines(self) -> int:
        """Records written so far (a checkpoint's ``metrics_lines``)."""
        with self._lock:
            return self.log.lines

    def close(self) -> None:
        with self._lock:
            self.log.close()
