"""report.py: the matrix and slow-worker tables from finished run directories, checked by hand."""

import json
from pathlib import Path

import numpy as np
import pytest

from recipes.analysis.leaderboard import leaderboard_table, ranks
from recipes.analysis.plots import plot_curves
from recipes.analysis.report import (
    along_table,
    cell_losses,
    correction_over_time,
    correction_table,
    grid_table,
    paired_improvement,
    slow_worker_table,
    sweep_table,
)
from recipes.cli import UserError


def fake_run(compare_dir: Path, label: str, seed: int, final: float, at_time: float, wallclock: float = 50.0):
    """A finished run: start, "time" and "final" evaluations and a summary with eval_times."""
    run = compare_dir / "runs" / f"{label}-seed{seed}"
    run.mkdir(parents=True)
    evals = [("start", 0.0, 7.0), ("time", wallclock, at_time), ("final", 80.0, final)]
    lines = [
        json.dumps({"event": "eval", "reason": r, "time": t, "tokens": int(t * 100), "val_loss/mean": v})
        for r, t, v in evals
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text(json.dumps({"config": {"eval_times": [wallclock]}}))


def test_sweep_table_reads_name_at_lr_labels_and_a_plain_label_s_own_lr(tmp_path):
    """``name@lr`` labels give (method, η); a plain label is its method at the η its runs used, so a
    ladder can sit beside the default runs it is compared with; the best η per method is bold."""
    for label, final in (("topk@1.4", 8.5), ("topk@2.8", 8.3), ("mla", 7.8)):
        fake_run(tmp_path, label, 100, final, final)
    summary = tmp_path / "runs" / "mla-seed100" / "summary.json"
    summary.write_text(json.dumps({"outer_lr": 0.7, "config": {"eval_times": [50.0]}}))
    table = sweep_table(tmp_path, tmp_path / "out")
    assert "| topk | — | 8.5000 | **8.3000** | 2.8 |" in table
    assert "| mla | **7.8000** | — | — | 0.7 |" in table
    assert (tmp_path / "out" / "lr_sweep.png").exists()


def test_cell_losses_reads_the_final_and_the_wallclock_evaluation(tmp_path):
    fake_run(tmp_path, "heloco", 0, final=5.0, at_time=5.5)
    fake_run(tmp_path, "async", 0, final=6.0, at_time=6.5)
    losses = cell_losses(tmp_path)
    assert losses["tokens"] == {"heloco": {0: 5.0}, "async": {0: 6.0}}
    assert losses["time"] == {"heloco": {0: 5.5}, "async": {0: 6.5}}


def test_paired_improvement_is_per_seed_relative_to_the_baseline():
    assert paired_improvement({0: 6.0, 1: 4.0, 2: 9.0}, {0: 5.0, 1: 5.0}) == pytest.approx([100 / 6, -25.0])


def test_grid_table_reports_improvements_and_wins(tmp_path):
    for cell, base in (("a_iid", 6.0), ("b_p08", 4.0)):
        for seed in (0, 1):
            fake_run(tmp_path / cell, "heloco", seed, final=5.0, at_time=5.0)
            fake_run(tmp_path / cell, "async", seed, final=base, at_time=base)
    text = grid_table(tmp_path, tmp_path / "out")
    # a_iid: (6 − 5)/6 = +16.67% in both seeds; b_p08: (4 − 5)/4 = −25%
    assert "| async | +16.67% (2/2) | -25.00% (0/2) |" in text
    assert "| heloco | 5.0000 ± 0.0000 | 5.0000 ± 0.0000 |" in text
    assert (tmp_path / "out" / "grid_improvement.png").stat().st_size > 0


def test_slow_worker_table_has_one_row_per_count_and_a_column_per_slowdown(tmp_path):
    for n in (1, 2):
        for s in (2, 8):
            cell = tmp_path / f"n{n}_s{s}"
            fake_run(cell, "heloco", 0, final=5.0, at_time=5.0)
            fake_run(cell, "sync", 0, final=4.0 + n, at_time=5.0 + s)
    text = slow_worker_table(tmp_path, tmp_path / "out")
    assert "| sync | 1 | 5.0000 | 5.0000 |" in text
    assert "| sync | 2 | 6.0000 | 6.0000 |" in text
    # n=2: tokens (6 − 5)/6 = +16.67%; wall-clock s=2 (7 − 5)/7 = +28.57%, s=8 (13 − 5)/13 = +61.54%
    assert "| sync | 2 | +16.67% / +28.57% | +16.67% / +61.54% |" in text
    assert (tmp_path / "out" / "slow_workers.png").stat().st_size > 0


def test_grid_cells_are_ordered_from_homogeneous_to_severe(tmp_path):
    for cell in ("severe_iid", "homogeneous_iid", "moderate_iid"):
        fake_run(tmp_path / cell, "heloco", 0, final=5.0, at_time=5.0)
        fake_run(tmp_path / cell, "async", 0, final=6.0, at_time=6.0)
    header = grid_table(tmp_path, tmp_path / "out").splitlines()[2]
    assert header == "| method | homogeneous_iid | moderate_iid | severe_iid |"


def test_grid_table_without_a_baseline_says_what_is_missing(tmp_path):
    fake_run(tmp_path / "severe_iid", "heloco", 0, final=5.0, at_time=5.0)
    with pytest.raises(UserError, match="needs finished runs"):
        grid_table(tmp_path, tmp_path / "out")


def test_slow_worker_cells_not_run_show_a_dash(tmp_path):
    fake_run(tmp_path / "n1_s2", "heloco", 0, final=5.0, at_time=5.0)
    fake_run(tmp_path / "n1_s2", "async", 0, final=6.0, at_time=6.0)
    fake_run(tmp_path / "n1_s8", "heloco", 0, final=5.0, at_time=5.0)  # async not run here
    text = slow_worker_table(tmp_path, tmp_path / "out")
    assert "| async | 1 | 6.0000 | — |" in text
    assert "| async | 1 | +16.67% / +16.67% | — / — |" in text


def test_slow_worker_table_on_a_directory_without_cells_says_what_it_expects(tmp_path):
    (tmp_path / "unrelated").mkdir()
    with pytest.raises(UserError, match="n<slow workers>_s<slowdown>"):
        slow_worker_table(tmp_path, tmp_path / "out")


def evals_until(end: float, loss: float) -> list[dict]:
    return [
        {"event": "eval", "reason": r, "time": t, "tokens": int(t), "val_loss/mean": loss}
        for r, t in (("start", 0.0), ("periodic", end / 2), ("final", end))
    ]


def test_wallclock_plot_zooms_on_the_async_horizon_only_when_sync_runs_much_longer(tmp_path):
    async_runs = [evals_until(600.0, 5.0)]
    long_sync = {"sync": [evals_until(1200.0, 4.0)], "heloco": async_runs}
    assert plot_curves(long_sync, "time", tmp_path / "t.png", "x", horizon=600.0) == [1200.0, 600.0]
    assert (tmp_path / "t.png").exists()
    close_sync = {"sync": [evals_until(800.0, 4.0)], "heloco": async_runs}
    assert plot_curves(close_sync, "time", tmp_path / "c.png", "x", horizon=600.0) == [800.0]
    assert plot_curves(long_sync, "tokens", tmp_path / "k.png", "x", horizon=600.0) == [1200.0]


def test_correction_table_splits_fresh_and_stale_arrivals(tmp_path):
    run = tmp_path / "runs" / "heloco-seed0"
    run.mkdir(parents=True)
    stats = {"correction/mean_cosine": 0.1, "correction/frac_blocks_shrunk": 0.0}
    arrivals = [
        {"worker": 0, "staleness": 0, "correction/frac_blocks_corrected": 0.5, "correction/mean_lambda": 0.1},
        {"worker": 0, "staleness": 0, "correction/frac_blocks_corrected": 1.0, "correction/mean_lambda": 0.3},
        {
            "worker": 1,
            "staleness": 4,
            "correction/frac_blocks_corrected": 0.25,
            "correction/mean_lambda": 0.5,
        },
        {"worker": 1, "staleness": 2},  # an arrival without correction stats (e.g. a sync round)
    ]
    lines = [
        json.dumps({"event": "arrival", "tokens": 10 * i, **stats, **a}) for i, a in enumerate(arrivals[:3])
    ]
    lines.append(json.dumps({"event": "arrival", "tokens": 40, **arrivals[3]}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text("{}")
    rows = [line.split(" | ") for line in correction_table(tmp_path, tmp_path / "out").splitlines()[2:]]
    # method, arrivals, mean τ per worker (0: 0, 1: 3), kind, share of arrivals, tensors corrected, ..., mean λ
    assert [r[1:6] for r in rows] == [
        ["4", "0.0, 3.0", "fresh", "0.50", "0.750"],
        ["4", "0.0, 3.0", "stale", "0.25", "0.250"],
        ["4", "0.0, 3.0", "all", "0.75", "0.583"],
    ]
    assert [r[8] for r in rows] == ["0.200", "0.500", "0.300"]
    assert (tmp_path / "out" / "corrections.md").exists()
    correction_over_time(tmp_path, tmp_path / "out")
    assert (tmp_path / "out" / "corrections_over_time.png").exists()


def test_along_table_compares_the_two_methods_at_every_shared_evaluation(tmp_path):
    for label, losses in (("mla", [8.0, 6.0, 5.0]), ("heloco", [8.0, 5.7, 5.5])):
        run = tmp_path / "runs" / f"{label}-seed0"
        run.mkdir(parents=True)
        lines = [
            json.dumps({"event": "eval", "reason": "periodic", "tokens": 1000 * i, "val_loss/mean": v})
            for i, v in enumerate(losses)
        ]
        lines.append(json.dumps({"event": "eval", "reason": "time", "tokens": 1500, "val_loss/mean": 1.0}))
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (run / "summary.json").write_text("{}")
    rows = along_table(tmp_path, tmp_path / "out").splitlines()
    assert rows[2] == "| seed | 0k | 1k | 2k |"
    assert (
        rows[4] == "| 0 | +0.00 | +5.00 | -10.00 |"
    )  # (6 - 5.7)/6 and (5 - 5.5)/5; the "time" eval is left out
    assert (tmp_path / "out" / "heloco_vs_mla_along.png").stat().st_size > 0


def test_along_table_names_a_missing_method(tmp_path):
    fake_run(tmp_path, "heloco", 0, final=5.0, at_time=5.0)
    with pytest.raises(UserError, match=r"no finished runs labelled \['mla'\]; found \['heloco'\]"):
        along_table(tmp_path, tmp_path / "out")


def test_overlapping_curves_get_their_own_marks_a_difference_panel_and_a_note():
    from recipes.analysis.plots import close_pairs, curves_figure

    def run(losses):
        return [
            {"event": "eval", "reason": r, "time": 100.0 * i, "tokens": 100 * i, "val_loss/mean": v}
            for i, (r, v) in enumerate(zip(("start", "updates", "final"), losses, strict=True))
        ]

    results = {
        "sync": [run([9.0, 8.0, 7.0])],
        "mla": [run([9.0, 8.5, 8.0004])],  # 0.005% from heloco at the end: the curves overlap
        "heloco": [run([9.0, 8.5, 8.0])],
    }
    fig, ends = curves_figure(results, "tokens", "t", reference="heloco")
    loss_ax, diff_ax = fig.axes
    assert ends == [200.0]
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    looks = {(line.get_marker(), line.get_linestyle()) for line in loss_ax.get_lines()}
    assert len(looks) == 3  # no two methods drawn alike
    notes = [t.get_text() for t in loss_ax.texts]
    assert notes == ["mla and heloco: final losses 0.005% apart (curves overlap)"]
    diffs = {
        line.get_label(): line.get_ydata()
        for line in diff_ax.get_lines()
        if not line.get_label().startswith("_")
    }
    assert list(diffs) == ["mla"]  # magnified: the method within 1% of heloco all along, not sync
    np.testing.assert_allclose(diffs["mla"], [0.0, 0.0, 0.005], atol=1e-9)
    fig, _ = curves_figure({m: results[m] for m in ("sync", "heloco")}, "tokens", "t", reference="heloco")
    assert len(fig.axes) == 1 and not fig.axes[0].texts  # nothing overlaps: no panel, no note
    assert close_pairs({"a": 8.0, "b": 8.009, "c": 7.995}) == [("a", "c", pytest.approx(0.005 / 7.995 * 100))]


def test_the_zoom_panel_is_labelled_like_the_whole_run():
    from recipes.analysis.plots import curves_figure

    async_runs = [evals_until(600.0, 5.0)]
    fig, ends = curves_figure({"sync": [evals_until(1200.0, 4.0)], "heloco": async_runs}, "time", "x", 600.0)
    assert ends == [1200.0, 600.0] and len(fig.axes) == 2
    assert all(ax.get_xlabel() and ax.get_ylabel() and ax.get_title() for ax in fig.axes)


def test_language_bars_start_at_zero_with_the_legend_outside_and_a_difference_panel():
    from recipes.analysis.plots import languages_figure

    finals = {
        "sync": [{"val_loss/de": 7.8, "val_loss/en": 7.9}],
        "heloco": [{"val_loss/de": 8.0, "val_loss/en": 8.0}],
    }
    fig = languages_figure(finals, ["de", "en"], "t", reference="heloco")
    bars_ax, diff_ax = fig.axes
    assert bars_ax.get_ylim()[0] == 0.0
    assert bars_ax.get_legend() is None and diff_ax.get_legend() is None and len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sync", "heloco"]
    heights = [p.get_height() for p in diff_ax.patches]
    np.testing.assert_allclose(heights, [-2.5, -1.25])  # (7.8 − 8) / 8, (7.9 − 8) / 8 in %
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)


def test_leaderboard_ranks_each_cell_and_budget_and_orders_by_mean_rank(tmp_path):
    # moderate: a 5.0/5.2, b 6.0/5.0, c 5.5/5.5; extreme: a 7.0/7.0, b 6.0/6.0, c 8.0/8.0
    for cell, rows in (
        ("moderate", {"a": (5.0, 5.2), "b": (6.0, 5.0), "c": (5.5, 5.5)}),
        ("extreme", {"a": (7.0, 7.0), "b": (6.0, 6.0), "c": (8.0, 8.0)}),
    ):
        for label, (final, at_time) in rows.items():
            for seed in (0, 1):
                fake_run(tmp_path / cell, label, seed, final=final, at_time=at_time)
    fake_run(tmp_path / "moderate", "partial", 0, final=1.0, at_time=1.0)  # one cell only: not ranked
    text = leaderboard_table(tmp_path, tmp_path / "out")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "method" not in line]
    # columns: extreme tokens, extreme time, moderate tokens, moderate time
    # ranks a: 2, 2, 1, 2 → 1.75; b: 1, 1, 3, 1 → 1.5; c: 3, 3, 2, 3 → 2.75
    assert rows[0] == (
        "| b | 6.0000 ± 0.0000 (1) | 6.0000 ± 0.0000 (1) | 6.0000 ± 0.0000 (3) | 5.0000 ± 0.0000 (1) | 1.5 |"
    )
    assert rows[1].startswith("| a |") and rows[1].endswith("| 1.8 |")
    assert rows[2].startswith("| c |") and rows[2].endswith("| 2.8 |")
    assert "Not ranked (missing a cell or a seed): partial." in text
    assert (tmp_path / "out" / "leaderboard.png").stat().st_size > 0


def test_ranks_share_the_better_rank_on_ties():
    assert ranks({"a": 2.0, "b": 1.0, "c": 2.0}) == {"a": 2, "b": 1, "c": 2}
