"""End-to-end runs of recipes/train.py in simulate mode on tiny shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.config import config_from_dict
from recipes.methods import METHOD_SPECS
from recipes.run_state import read_checkpoint
from recipes.train import run

METHODS = list(METHOD_SPECS)


def base_values(shards: Path, out: Path, **overrides) -> dict:
    values = dict(
        data_dir=str(shards),
        num_workers=3,
        worker_speeds=[1.0, 0.5, 0.25],
        inner_steps=3,
        batch_size=4,
        inner_lr=3e-3,
        pretrain_steps=20,
        pretrain_cache_dir=str(out.parent / "pretrain_cache"),
        budget_tokens=4000,
        eval_every=4,
        eval_sequences=8,
        report_to="none",
        progress=False,
        output_dir=str(out),
        model_size="tiny",
    )
    values.update(overrides)
    return values


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_checkpoints(method, tiny_shards, tmp_path):
    out = tmp_path / method
    extra = {"dylu": True} if method == "async_dn" else {}
    summary = run(config_from_dict(base_values(tiny_shards, out, method=method, **extra)))
    metrics = read_metrics(out)
    evals = [r for r in metrics if r["event"] == "eval"]
    assert evals[0]["reason"] == "start" and evals[-1]["reason"] == "final"
    assert evals[-1]["val_loss/mean"] < evals[0]["val_loss/mean"] - 0.05
    for lang in ("de", "en", "es", "fr"):
        assert f"val_loss/{lang}" in evals[-1]
    assert summary["tokens"] >= 4000
    checkpoint = out / f"checkpoint-{summary['arrivals']}"
    for name in (
        "model/model.safetensors",
        "model/config.json",
        "model/tokenizer.json",
        "aggregator.safetensors",
        "aggregator.json",
        "workers.safetensors",
        "run.json",
    ):
        assert (checkpoint / name).is_file(), name
    arrivals = [r for r in metrics if r["event"] == "arrival"]
    if method == "sync":
        assert all(r["staleness"] == 0 for r in arrivals)
        assert summary["outer_updates"] * 3 == summary["arrivals"]
    else:
        assert summary["outer_updates"] == summary["arrivals"]
        slow = [r["staleness"] for r in arrivals if r["worker"] == 2]
        fast = [r["staleness"] for r in arrivals if r["worker"] == 0]
        assert sum(slow) / len(slow) > sum(fast) / len(fast)
    if method == "heloco":
        stale = [r for r in arrivals if r["staleness"] > 0 and r["version"] > 1]
        assert stale and all("correction/mean_cosine" in r for r in stale)


def test_resume_is_bit_for_bit(tiny_shards, tmp_path):
    common = dict(method="heloco", save_every=4, budget_tokens=3500)
    full = tmp_path / "full"
    run(config_from_dict(base_values(tiny_shards, full, **common)))
    cut = tmp_path / "cut"
    interrupted = run(config_from_dict(base_values(tiny_shards, cut, stop_after_arrivals=10, **common)))
    assert interrupted["interrupted"]
    assert not (cut / "summary.json").exists()
    run(config_from_dict(base_values(tiny_shards, cut, resume_from="latest", **common)))
    assert read_metrics(cut) == read_metrics(full)
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert a["final_val_loss"] == b["final_val_loss"]


def test_same_seed_same_metrics_and_same_data_order_across_methods(tiny_shards, tmp_path):
    first = tmp_path / "a"
    run(config_from_dict(base_values(tiny_shards, first, method="async_dn")))
    second = tmp_path / "b"
    run(config_from_dict(base_values(tiny_shards, second, method="async_dn")))
    assert read_metrics(first) == read_metrics(second)
    other = tmp_path / "c"
    run(config_from_dict(base_values(tiny_shards, other, method="sync")))

    def checksums(path):
        per_worker: dict[int, list[int]] = {}
        for r in read_metrics(path):
            if r["event"] == "arrival":
                per_worker.setdefault(r["worker"], []).append(r["data_checksum"])
        return per_worker

    dn, sync = checksums(first), checksums(other)
    for worker in range(3):
        n = min(len(dn[worker]), len(sync[worker]))
        assert n >= 1 and dn[worker][:n] == sync[worker][:n]


def test_equal_wallclock_eval_is_recorded(tiny_shards, tmp_path):
    out = tmp_path / "t"
    run(config_from_dict(base_values(tiny_shards, out, method="sync", eval_times=[13.0])))
    timed = [r for r in read_metrics(out) if r["event"] == "eval" and r["reason"] == "time"]
    assert len(timed) == 1 and timed[0]["time"] == 13.0
    last_before = [r for r in read_metrics(out) if r["event"] == "arrival" and r["time"] <= 13.0][-1]
    assert timed[0]["version"] == last_before["version"]


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"method": "diloco"}, ValueError, "method must be one of"),
        ({"worker_speeds": [1.0, 0.5]}, ValueError, "worker_speeds has 2 entries but num_workers is 3"),
        ({"budget_tokens": -5}, ValueError, "budget_tokens must be > 0"),
        ({"worker_speeds": [1.0, 0.0, 1.0]}, ValueError, r"worker_speeds\[1\]"),
        ({"staleness_weighting": "linear"}, ValueError, "staleness_weighting must be one of"),
        ({"dylu": True, "dylu_power": 1.5}, ValueError, r"dylu_power must be in \[0, 1\]"),
        ({"dylu_power": 0.5}, ValueError, "dylu_power is only read with dylu: true"),
    ],
)
def test_bad_config_is_rejected_before_anything_runs(overrides, error, match, tiny_shards, tmp_path):
    with pytest.raises(error, match=match):
        config_from_dict(base_values(tiny_shards, tmp_path / "x", **overrides))


def test_missing_or_mismatched_shards_fail_before_training(tiny_shards, tmp_path):
    with pytest.raises(FileNotFoundError):
        run(config_from_dict(base_values(tmp_path / "nope", tmp_path / "x")))
    with pytest.raises(ValueError, match="K=3"):
        run(
            config_from_dict(
                base_values(tiny_shards, tmp_path / "y", num_workers=4, worker_speeds=[1.0, 1.0, 1.0, 1.0])
            )
        )
    assert not (tmp_path / "y" / "metrics.jsonl").exists()


def test_yaml_and_command_line_override(tmp_path):
    from recipes.config import parse_config

    config_file = tmp_path / "c.yaml"
    config_file.write_text("method: async\nnum_workers: 2\nworker_speeds: [1.0, 0.5]\nouter_lr: 0.1\n")
    config = parse_config(["--config", str(config_file), "--outer_lr", "0.3"])
    assert (
        config.diloco.method == "async"
        and config.outer_lr == 0.3
        and config.diloco.worker_speeds == [1.0, 0.5]
    )
    config_file.write_text("methd: async\n")
    with pytest.raises(ValueError, match="methd"):
        parse_config(["--config", str(config_file)])


def test_workers_never_share_optimizer_state(tiny_shards, tmp_path):
    """Every worker keeps its own AdamW moments: after a run, step counts follow each worker's rounds."""
    out = tmp_path / "own"
    summary = run(config_from_dict(base_values(tiny_shards, out, method="async", budget_tokens=2000)))
    state = read_checkpoint(out / f"checkpoint-{summary['arrivals']}", "simulate")
    workers = state.workers["workers"]
    arrivals = [r for r in read_metrics(out) if r["event"] == "arrival"]
    for k, worker in enumerate(workers):
        rounds = sum(1 for r in arrivals if r["worker"] == k)
        assert float(worker["optimizer"]["state"][0]["step"]) == 20 + 3 * rounds
        assert worker["local_step"] == 3 * rounds
