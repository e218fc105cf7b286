"""recipes/analysis/compare.py on tiny shards: runs a matrix in subprocesses, resumes, plots and tabulates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recipes.analysis.compare import equal_wallclock, load_matrix, main, run_configs
from recipes.analysis.plots import final_eval, read_evals
from recipes.cli import ConfigError
from tests.test_recipe_train import base_values


def write_matrix(tmp_path: Path, shards: Path) -> Path:
    base = base_values(shards, tmp_path / "unused", budget_tokens=1500, pretrain_steps=10)
    base.pop("output_dir")
    spec = {
        "name": "mini",
        "output_dir": str(tmp_path / "out"),
        "jobs": 2,
        "seeds": [0, 1],
        "reference": "heloco",
        "base": base,
        "methods": {"sync": {"method": "sync"}, "heloco": {"method": "heloco"}},
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_compare_runs_plots_and_tables(tiny_shards, tmp_path):
    config = write_matrix(tmp_path, tiny_shards)
    text = main(["--config", str(config), "--docs_dir", str(tmp_path / "docs")])
    out = tmp_path / "out"
    for name in ("loss_vs_tokens.png", "loss_vs_time.png", "loss_per_language.png", "results.md"):
        assert (out / name).stat().st_size > 0
        assert (tmp_path / "docs" / name).exists()
    rows = [line for line in text.splitlines() if line.startswith("| sync") or line.startswith("| heloco")]
    assert len(rows) >= 2
    sync_row = next(r for r in rows if r.startswith("| sync |"))
    assert "%" in sync_row and "per seed" in sync_row
    # the final pooled metrics: the same loss as the equal-tokens column, an accuracy, a perplexity
    metrics_row = next(
        line for line in text.splitlines() if line.startswith("| heloco |") and line.count("±") == 3
    )
    results_row = next(line for line in rows if line.startswith("| heloco |") and "—" in line)
    loss, accuracy, perplexity = (cell.split(" ± ")[0] for cell in metrics_row.split(" | ")[1:4])
    assert loss == results_row.split(" | ")[1].split(" ± ")[0]
    assert 0.0 < float(accuracy) < 1.0 and float(perplexity) > 1.0
    for method in ("sync", "heloco"):
        for seed in (0, 1):
            assert (out / "runs" / f"{method}-seed{seed}" / "summary.json").exists()
    # a second invocation skips finished runs and rewrites the same table
    assert main(["--config", str(config)]) == text
    # --only reports the chosen label's finished runs, and names the labels when one is unknown
    only = main(["--config", str(config), "--only", "sync"]).splitlines()
    assert [line.split(": ")[0] for line in only] == ["sync seed 0", "sync seed 1"]
    final = final_eval(read_evals(out / "runs" / "sync-seed0"))["val_loss/mean"]
    assert only[0] == f"sync seed 0: final val_loss/mean {final:.4f}"
    with pytest.raises(ConfigError, match="unknown labels \\['nope'\\]"):
        main(["--config", str(config), "--only", "nope"])
    # --report_only runs nothing: with heloco seed 1 unfinished, it pairs the seeds both methods finished
    (out / "runs" / "heloco-seed1" / "summary.json").unlink()
    partial = main(["--config", str(config), "--report_only"])
    assert not (out / "runs" / "heloco-seed1" / "summary.json").exists()
    sync_row = next(line for line in partial.splitlines() if line.startswith("| sync |") and "%" in line)
    assert sync_row.count("(seed 0 only)") == 2


def test_equal_wallclock_by_hand():
    # 1000 tokens at 4 * 16 = 64 tokens per step and 2.5 steps per second in total
    assert (
        equal_wallclock({"budget_tokens": 1000, "batch_size": 4, "worker_speeds": [1.0, 1.0, 0.5]}, 16)
        == 6.25
    )


def test_a_finished_run_with_other_settings_is_not_reused(tiny_shards, tmp_path):
    import pytest

    config = write_matrix(tmp_path, tiny_shards)
    spec = yaml.safe_load(config.read_text())
    spec["methods"] = {"heloco": {"method": "heloco"}}
    spec["seeds"] = [0]
    config.write_text(yaml.safe_dump(spec))
    main(["--config", str(config)])
    spec["methods"]["heloco"]["outer_lr"] = 0.3
    config.write_text(yaml.safe_dump(spec))
    with pytest.raises(FileExistsError, match="other settings"):
        main(["--config", str(config)])


def test_a_default_a_method_never_reads_does_not_invalidate_its_finished_run(tmp_path):
    """Changing HeLoCo's keep_threshold must not orphan finished async runs, but must orphan heloco's."""
    import json

    import pytest

    from recipes.analysis.compare import finished_matches
    from recipes.config import config_from_dict

    for method in ("async", "heloco_project", "heloco"):
        out = tmp_path / method
        out.mkdir()
        values = {"method": method, "output_dir": str(out)}
        done = config_from_dict({**values, "keep_threshold": 0.42})
        summary = {"config": done.to_dict(), "outer_lr": done.outer_lr}
        (out / "summary.json").write_text(json.dumps(summary))
        if method == "heloco":
            with pytest.raises(FileExistsError, match="keep_threshold"):
                finished_matches(out, values)
        else:
            assert finished_matches(out, values)
            with pytest.raises(FileExistsError, match="outer_momentum"):
                finished_matches(out, {**values, "outer_momentum": 0.5})


def test_fields_not_read_match_what_each_method_builds():
    from recipes.methods import fields_not_read

    assert "keep_threshold" in fields_not_read("heloco_project") and "correct_fresh" not in fields_not_read(
        "heloco_project"
    )
    assert not {"keep_threshold", "correct_fresh"} & fields_not_read("heloco")
    assert "dn_buffer_size" not in fields_not_read("async_dn") and "dn_buffer_size" in fields_not_read("sync")


def test_an_interrupted_comparison_continues_from_the_newest_checkpoint(tiny_shards, tmp_path):
    """A run cut short (as if killed after 5 arrivals, checkpoints every 2) is continued by the next
    invocation from checkpoint-4 and ends with the metrics of an uninterrupted run, byte for byte."""
    config = write_matrix(tmp_path, tiny_shards)
    spec = yaml.safe_load(config.read_text())
    spec["methods"] = {"heloco": {"method": "heloco"}}
    spec["base"].update(save_every=2, budget_tokens=3000)  # 8 arrivals of 384 tokens
    for name, extra in (("whole", {}), ("cut", {"stop_after_arrivals": 5})):
        spec["output_dir"] = str(tmp_path / name)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**spec, "base": {**spec["base"], **extra}}))
        main(["--config", str(tmp_path / f"{name}.yaml"), "--seeds", "0", "--only", "heloco"])
    cut = tmp_path / "cut" / "runs" / "heloco-seed0"
    assert not (cut / "summary.json").exists() and (cut / "checkpoint-4").is_dir()
    main(
        [
            "--config",
            str(tmp_path / "whole.yaml"),
            "--seeds",
            "0",
            "--only",
            "heloco",
            "--output_dir",
            str(tmp_path / "cut"),
        ]
    )
    assert "resumed from" in (cut / "train.log").read_text()
    whole = tmp_path / "whole" / "runs" / "heloco-seed0"
    assert (cut / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()


COMMUNICATION = Path(__file__).parents[1] / "recipes" / "configs" / "communication"


@pytest.mark.parametrize("path", sorted(COMMUNICATION.glob("*.yaml")), ids=lambda p: p.name)
def test_every_communication_matrix_validates(path):
    """Each label of each communication comparison builds a valid train config for every seed."""
    spec = load_matrix(path)
    runs = run_configs(spec)
    assert len(runs) == len(spec["methods"]) * len(spec["seeds"]) > 0


@pytest.mark.parametrize(
    ("report", "runs"),
    [("topk2pct_full_budget.yaml", "topk_full_budget.yaml"), ("topk2pct_10pct.yaml", "topk_levers.yaml")],
)
def test_head_to_head_matrices_read_the_runs_of_their_source(report, runs):
    """The 2% head-to-head configs report runs made by another config: each (label, seed) they name
    must be the very same train config, or their tables would mix runs of another setting."""
    full = load_matrix(COMMUNICATION / runs)
    head = load_matrix(COMMUNICATION / report)
    assert head["output_dir"] == full["output_dir"]
    full["seeds"] = head["seeds"]
    made = {(label, seed): values for label, seed, values in run_configs(full)}
    for label, seed, values in run_configs(head):
        assert made[(label, seed)] == values, (label, seed)
