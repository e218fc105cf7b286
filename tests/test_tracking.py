"""recipes/tracking.py: metrics.jsonl as an Accelerate tracker. The file's bytes must equal the old
MetricsLog's (json.dumps(record) + newline per record: committed results are compared bit for bit),
and one write must reach the other trackers as numeric ``event/key`` values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from recipes.tracking import JsonlTracker, MetricsLog

RECORDS: list[dict[str, Any]] = [
    {"event": "arrival", "worker": 0, "arrival": 1, "time": 0.5, "loss": 3.25, "stale": False},
    {"event": "eval", "reason": "time", "arrival": 1, "time": 0.5, "val_loss": {"mean": 3.0}, "ok": True},
    {"event": "arrival", "worker": 1, "arrival": 2, "time": 1.25, "loss": float("nan"), "note": "ü"},
]


def jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


class Recorder(GeneralTracker):
    """Stands for TensorBoard/wandb: keeps what accelerator.log hands it."""

    name = "recorder"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[dict, int | None, dict]] = []
        self.config: dict | None = None
        self.finished = False

    @property
    def tracker(self) -> Recorder:
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = values

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.logged.append((values, step, kwargs))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def accelerator_and_recorder() -> tuple[Accelerator, Recorder]:
    recorder = Recorder()
    return Accelerator(cpu=True, log_with=[recorder]), recorder


def test_file_holds_records_verbatim_and_trackers_get_prefixed_numbers(tmp_path, accelerator_and_recorder):
    accelerator, recorder = accelerator_and_recorder
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, accelerator)
    # Created before init_trackers, as in recipes/train.py: init_trackers appends, never drops it.
    accelerator.init_trackers("run", config={"lr": "0.1"})
    assert accelerator.get_tracker("jsonl") is log.tracker
    assert recorder.config == {"lr": "0.1"}
    for step, record in enumerate(RECORDS, start=1):
        log.write(record, step=step)
    assert log.lines == 3
    assert path.read_text() == jsonl(RECORDS)  # init_trackers' configuration did not reach the file

    values, step, kwargs = recorder.logged[0]
    assert values == {"arrival/worker": 0, "arrival/arrival": 1, "arrival/time": 0.5, "arrival/loss": 3.25}
    assert (step, kwargs) == (1, {})  # the full record goes to the jsonl tracker only
    values, step, _ = recorder.logged[1]
    assert values == {"eval/arrival": 1, "eval/time": 0.5}  # no strings, dicts nor bools
    assert step == 2
    assert "arrival/note" not in recorder.logged[2][0]
    log.close()
    accelerator.end_training()
    assert recorder.finished


def test_each_line_is_flushed_at_once(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", Accelerator(cpu=True))
    log.write(RECORDS[0], step=1)
    assert (tmp_path / "metrics.jsonl").read_text() == jsonl(RECORDS[:1])  # still open, already on disk
    log.close()


def test_log_without_record_writes_the_values_with_their_step(tmp_path):
    tracker = JsonlTracker(tmp_path / "m.jsonl")
    tracker.log({"loss": 1.5}, step=7)
    tracker.finish()
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 7, "loss": 1.5}\n'
    assert tracker.lines == 1


def test_resume_cuts_the_file_back_to_keep_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(jsonl(RECORDS))  # a crashed run wrote past its last checkpoint
    log = MetricsLog(path, Accelerator(cpu=True), keep_lines=1)
    assert log.lines == 1
    assert path.read_text() == jsonl(RECORDS[:1])
    log.write(RECORDS[2], step=2)
    log.close()
    assert path.read_text() == jsonl([RECORDS[0], RECORDS[2]])


def test_resume_with_a_short_file_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(jsonl(RECORDS[:1]))
    with pytest.raises(RuntimeError, match="has 1 lines, the checkpoint expects 2"):
        JsonlTracker(path, keep_lines=2)
    with pytest.raises(RuntimeError, match="has 0 lines, the checkpoint expects 1"):
        JsonlTracker(tmp_path / "missing.jsonl", keep_lines=1)
    assert path.read_text() == jsonl(RECORDS[:1])  # left untouched


def test_a_fresh_log_empties_an_old_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(jsonl(RECORDS))
    assert JsonlTracker(path).lines == 0
    assert path.read_text() == ""


def test_finish_closes_the_file_and_close_unregisters_the_tracker(tmp_path):
    accelerator = Accelerator(cpu=True)
    log = MetricsLog(tmp_path / "metrics.jsonl", accelerator)
    file = accelerator.get_tracker("jsonl", unwrap=True)
    assert not file.closed
    log.close()
    assert file.closed
    assert log.tracker not in accelerator.trackers
    accelerator.log({"x": 1.0}, step=1)  # no closed file left to write to
    accelerator.end_training()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_end_training_finishes_the_tracker(tmp_path):
    accelerator = Accelerator(cpu=True)
    tracker = MetricsLog(Path(tmp_path / "metrics.jsonl"), accelerator).tracker
    accelerator.end_training()
    assert tracker.tracker.closed
    tracker.finish()  # a second finish (MetricsLog.close after end_training) is harmless


def test_one_write_reaches_tensorboard(tmp_path):
    """The default report_to: scalars land under ``event/key`` in TensorBoard's event file."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    log = MetricsLog(tmp_path / "metrics.jsonl", accelerator)
    accelerator.init_trackers("run")
    for step, record in enumerate(RECORDS[:2], start=1):
        log.write(record, step=step)
    log.close()
    accelerator.end_training()
    assert (tmp_path / "metrics.jsonl").read_text() == jsonl(RECORDS[:2])
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"arrival/loss", "arrival/worker", "eval/arrival", "eval/time"} <= tags
    assert not {t for t in tags if t.endswith(("/event", "/reason", "/ok", "/stale"))}
    assert [(e.step, e.value) for e in events.Scalars("arrival/loss")] == [(1, 3.25)]
