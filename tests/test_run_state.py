"""Checkpoints that are verified before a resume uses them, and a full disk that never destroys the
previous checkpoint (recipes/run_state.py, the simulator's checkpoints, rank 0's background writer)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from heloco.checkpoint import list_checkpoints, save_state
from recipes.config import RecipeConfig, config_from_dict
from recipes.distributed.gate import Background
from recipes.run_state import (
    FORMAT_VERSION,
    MANIFEST,
    CorruptCheckpoint,
    RunState,
    find_checkpoint,
    read_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from recipes.train import run
from tests.test_recipe_train import base_values, read_metrics


class StubTokenizer:
    def save_pretrained(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tokenizer.json").write_text('{"stub": true}')


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, max_position_embeddings=16, **shape))


def make_state(arrivals: int) -> RunState:
    torch.manual_seed(arrivals)
    return RunState(
        mode="simulate",
        schedule={"arrivals": arrivals},
        aggregator={"global_params": [torch.randn(64)], "version": arrivals},
        metrics_lines=arrivals,
        inner_steps=[3, 3],
        workers={"replica": torch.randn(256), "step": arrivals},
        info={"time": float(arrivals)},
    )


def config(out: Path, keep: int = 2) -> RecipeConfig:
    return config_from_dict({"output_dir": str(out), "keep_checkpoints": keep})


def write(out: Path, arrivals: int, model: torch.nn.Module, keep: int = 2) -> Path:
    path = out / f"checkpoint-{arrivals}"
    return write_checkpoint(
        path, make_state(arrivals), model=model, tokenizer=StubTokenizer(), config=config(out, keep)
    )


def flip_byte(file: Path, offset: int = -1) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def names(out: Path) -> list[str]:
    """Everything in a run directory, temporaries (dot-names) included."""
    return sorted(p.name for p in out.iterdir())


# -- the manifest --------------------------------------------------------------------------------------


def test_manifest_lists_every_file_and_round_trips(model, tmp_path):
    path = write(tmp_path, 4, model)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == FORMAT_VERSION
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    assert {f["path"] for f in manifest["files"]} == on_disk
    assert {
        "model/model.safetensors",
        "aggregator.safetensors",
        "workers.json",
        "run.json",
        "config.json",
    } <= on_disk
    for entry in manifest["files"]:
        data = (path / entry["path"]).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    verify_checkpoint(path)
    (path / "notes.txt").write_text("a file the manifest does not list is ignored")
    back = read_checkpoint(path, "simulate")
    want = make_state(4)
    assert back.schedule == want.schedule and back.metrics_lines == 4 and back.inner_steps == [3, 3]
    assert torch.equal(back.aggregator["global_params"][0], want.aggregator["global_params"][0])
    assert torch.equal(back.workers["replica"], want.workers["replica"])


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize(
    ("name", "damage", "problem"),
    [
        ("aggregator.safetensors", truncate, r"aggregator\.safetensors has \d+ bytes, the manifest says \d+"),
        ("model/model.safetensors", flip_byte, r"model/model\.safetensors does not match its sha256"),
        ("workers.json", Path.unlink, r"workers\.json is missing"),
        (MANIFEST, Path.unlink, r"has no manifest\.json"),
        (MANIFEST, truncate, r"manifest\.json is unreadable"),
    ],
)
def test_damaged_checkpoint_is_refused_naming_the_problem(model, tmp_path, name, damage, problem):
    path = write(tmp_path, 4, model)
    damage(path / name)
    with pytest.raises(CorruptCheckpoint, match=problem) as refused:
        verify_checkpoint(path)
    assert str(path) in str(refused.value)
    with pytest.raises(CorruptCheckpoint, match=problem):
        read_checkpoint(path, "simulate")


def test_latest_falls_back_to_the_previous_complete_checkpoint(model, tmp_path, caplog):
    write(tmp_path, 4, model)
    newest = write(tmp_path, 8, model)
    flip_byte(newest / "workers.safetensors")
    with caplog.at_level(logging.WARNING, logger="recipes.run_state"):
        assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-4"
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "checkpoint-8" in warning.getMessage()
        and "workers.safetensors does not match" in warning.getMessage()
    )


def test_latest_with_nothing_that_verifies_says_what_was_refused(model, tmp_path):
    (write(tmp_path, 4, model) / "run.json").unlink()
    flip_byte(write(tmp_path, 8, model) / "aggregator.safetensors", offset=100)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint") as missing:
        find_checkpoint(tmp_path, "latest")
    message = str(missing.value)
    assert "checkpoint-8: aggregator.safetensors does not match" in message
    assert "checkpoint-4: run.json is missing" in message
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "empty", "latest")


def test_an_explicit_checkpoint_is_verified_without_fallback(model, tmp_path):
    write(tmp_path, 4, model)
    newest = write(tmp_path, 8, model)
    assert find_checkpoint(tmp_path, str(newest)) == newest
    flip_byte(newest / "run.json", offset=2)
    with pytest.raises(CorruptCheckpoint, match=r"checkpoint-8: run\.json does not match"):
        find_checkpoint(tmp_path, str(newest))
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoint-99"))


# -- a full disk -------------------------------------------------------------------------------------


def disk_full(file: Path) -> OSError:
    """Write the start of ``file`` as a full disk would, then fail like one."""
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(b"\0" * 1000)
    return OSError(errno.ENOSPC, "No space left on device", str(file))


def fill_disk_during(monkeypatch: pytest.MonkeyPatch, writer: str, checkpoint: str, model=None) -> None:
    """Make ``writer`` (``save_state`` or ``save_pretrained``) fail with ENOSPC midway through
    writing ``checkpoint``; every other write goes through."""

    def save_state_or_fail(directory: Path, name: str, state) -> None:
        if name == "workers" and Path(directory).name.startswith(f".{checkpoint}.tmp"):
            raise disk_full(Path(directory) / "workers.safetensors")
        save_state(directory, name, state)

    if writer == "save_state":
        monkeypatch.setattr("recipes.run_state.save_state", save_state_or_fail)
        return
    save_pretrained = model.save_pretrained

    def save_pretrained_or_fail(directory: Path, **kwargs) -> None:
        if Path(directory).parent.name.startswith(f".{checkpoint}.tmp"):
            raise disk_full(Path(directory) / "model.safetensors")
        save_pretrained(directory, **kwargs)

    monkeypatch.setattr(model, "save_pretrained", save_pretrained_or_fail)


@pytest.mark.parametrize("writer", ["save_state", "save_pretrained"])
@pytest.mark.parametrize("target", [8, 4], ids=["next", "same-arrivals"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_nothing_partial(
    model, tmp_path, monkeypatch, writer, target
):
    previous = write(tmp_path, 4, model, keep=1)  # keep=1: pruning after the write would delete it
    before = (previous / MANIFEST).read_text()
    fill_disk_during(monkeypatch, writer, f"checkpoint-{target}", model)
    with pytest.raises(OSError) as failed:
        write(tmp_path, target, model, keep=1)
    assert failed.value.errno == errno.ENOSPC
    assert names(tmp_path) == ["checkpoint-4"]
    assert (previous / MANIFEST).read_text() == before
    verify_checkpoint(previous)
    assert find_checkpoint(tmp_path, "latest") == previous


def test_rank_zero_background_writer_goes_on_after_a_full_disk(model, tmp_path, monkeypatch):
    """Distributed mode: a periodic checkpoint that fails is logged and kept as the background
    error (it goes to summary.json); later jobs still run and the earlier checkpoint stays whole."""
    fill_disk_during(monkeypatch, "save_state", "checkpoint-8")
    evaluated = []
    background = Background(
        lambda reason, info, params: evaluated.append(reason), lambda n: write(tmp_path, n, model)
    )
    background.start()
    background.put_checkpoint(4)
    background.put_checkpoint(8)
    background.put_eval("updates", {}, [])
    background.put_checkpoint(12)
    background.finish()
    assert isinstance(background.error, OSError) and background.error.errno == errno.ENOSPC
    assert evaluated == ["updates"]
    assert names(tmp_path) == ["checkpoint-12", "checkpoint-4"]
    for path in list_checkpoints(tmp_path):
        verify_checkpoint(path)


# -- end to end in simulate mode ---------------------------------------------------------------------

COMMON = dict(method="heloco", save_every=4, budget_tokens=3500)  # ≈10 arrivals: checkpoints 4, 8, final


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One folder for this module's runs, so that they share the cached warm start."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards, runs) -> Path:
    out = runs / "full"
    run(config_from_dict(base_values(tiny_shards, out, **COMMON)))
    return out


def test_periodic_checkpoint_on_a_full_disk_is_skipped_and_training_goes_on(
    uninterrupted, tiny_shards, monkeypatch, caplog
):
    out = uninterrupted.parent / "disk-full"
    fill_disk_during(monkeypatch, "save_state", "checkpoint-8")
    with caplog.at_level(logging.ERROR, logger="recipes.train"):
        summary = run(config_from_dict(base_values(tiny_shards, out, **COMMON)))
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "checkpoint-8" in error.getMessage() and "training goes on" in error.getMessage()
    assert read_metrics(out) == read_metrics(uninterrupted)
    final = out / f"checkpoint-{summary['arrivals']}"
    assert names(out) == sorted(["checkpoint-4", final.name, "metrics.jsonl", "summary.json"])
    verify_checkpoint(final)


def test_final_checkpoint_on_a_full_disk_stops_naming_the_last_complete_one(tiny_shards, runs, monkeypatch):
    out = runs / "final-fails"
    values = base_values(tiny_shards, out, method="heloco", save_every=3, budget_tokens=1500)
    fill_disk_during(
        monkeypatch, "save_state", "checkpoint-4"
    )  # 4 arrivals: checkpoint-3, final checkpoint-4
    with pytest.raises(
        OSError, match=r"final checkpoint .*checkpoint-4.*checkpoint-3, is still there"
    ) as failed:
        run(config_from_dict(values))
    assert failed.value.errno == errno.ENOSPC
    assert not (out / "summary.json").exists()
    assert names(out) == ["checkpoint-3", "metrics.jsonl"]
    verify_checkpoint(out / "checkpoint-3")


def test_resume_skips_a_corrupted_newest_checkpoint_and_is_still_bit_for_bit(
    uninterrupted, tiny_shards, caplog
):
    cut = uninterrupted.parent / "cut"
    assert run(config_from_dict(base_values(tiny_shards, cut, stop_after_arrivals=10, **COMMON)))[
        "interrupted"
    ]
    assert [p.name for p in list_checkpoints(cut)] == ["checkpoint-4", "checkpoint-8"]
    flip_byte(cut / "checkpoint-8" / "workers.safetensors")
    with caplog.at_level(logging.WARNING, logger="recipes.run_state"):
        run(config_from_dict(base_values(tiny_shards, cut, resume_from="latest", **COMMON)))
    assert any("checkpoint-8" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert read_metrics(cut) == read_metrics(uninterrupted)
    a = json.loads((uninterrupted / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert a["final_val_loss"] == b["final_val_loss"]
