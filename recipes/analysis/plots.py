"""Read runs' metrics.jsonl and draw the comparison: loss vs tokens, loss vs virtual wall-clock, final
loss per language, plus the markdown results table."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "eval"]


def read_arrivals(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "arrival"]


def curve(evals: list[dict[str, Any]], x: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean validation loss along ``x`` ("tokens" or "time"), evaluations in order of that axis."""
    points = sorted({(r[x], r["val_loss/mean"]) for r in evals if r["reason"] != "time" or x == "time"})
    return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)


def final_eval(evals: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in reversed(evals) if r["reason"] == "final")


def eval_at_time(evals: list[dict[str, Any]], virtual_time: float) -> dict[str, Any]:
    """The evaluation recorded for a fixed wall-clock budget (reason "time"), else the final one."""
    for r in evals:
        if r["reason"] == "time" and abs(r["time"] - virtual_time) < 1e-9:
            return r
    return final_eval(evals)


def _mean_curve(runs: list[list[dict[str, Any]]], x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    curves = [curve(evals, x) for evals in runs]
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
    grid = grid[(grid >= lo) & (grid <= hi)]
    ys = np.stack([np.interp(grid, cx, cy) for cx, cy in curves])
    return grid, ys.mean(0), ys.std(0)


# One look per method, in order: curves that lie on top of each other stay tellable apart by their
# markers (open, so a marker under another still shows) and line styles, not by colour alone.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
HATCHES = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")
CLOSE = 0.001  # two methods whose final losses differ by less than this (relative) are called out
NEAR = 0.01  # the difference panel shows the methods that stay this close (relative) to the reference
AXIS_LABEL = {"tokens": "tokens (DiLoCo phase, all workers)", "time": "virtual wall-clock (s)"}
LOSS_LABEL = "validation loss (mean over languages)"

Curves = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def method_style(index: int) -> dict[str, Any]:
    """Marker and line style of the ``index``-th method (colours follow matplotlib's cycle)."""
    return {
        "marker": MARKERS[index % len(MARKERS)],
        "ls": LINESTYLES[index % len(LINESTYLES)],
        "mfc": "none",
        "ms": 5,
        "lw": 1.6,
    }


def relative_difference(curves: Curves, reference: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each other method's (L_method − L_reference) / L_reference in percent, on the method's own
    evaluation points within the reference's range (the reference interpolated there)."""
    ref_x, ref_y, _ = curves[reference]
    out = {}
    for method, (grid, mean, _) in curves.items():
        if method == reference:
            continue
        keep = (grid >= ref_x[0]) & (grid <= ref_x[-1])
        at = np.interp(grid[keep], ref_x, ref_y)
        out[method] = (grid[keep], (mean[keep] - at) / at * 100)
    return out


def close_pairs(finals: dict[str, float], tolerance: float = CLOSE) -> list[tuple[str, str, float]]:
    """Pairs of methods whose final losses are within ``tolerance`` of each other (relative), with
    the relative difference in percent: their curves overlap, the plots say so."""
    names = list(finals)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            rel = abs(finals[a] - finals[b]) / min(finals[a], finals[b])
            if rel < tolerance:
                pairs.append((a, b, rel * 100))
    return pairs


def _draw_curves(ax, curves: Curves, x_max: float) -> None:
    for i, (method, (grid, mean, std)) in enumerate(curves.items()):
        keep = grid <= x_max * (1 + 1e-9)
        (line,) = ax.plot(grid[keep], mean[keep], label=method, **method_style(i))
        ax.fill_between(
            grid[keep], (mean - std)[keep], (mean + std)[keep], alpha=0.15, color=line.get_color()
        )
    ax.grid(alpha=0.3)


def near_reference(
    curves: Curves, reference: str, within: float = NEAR
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The methods whose curve stays within ``within`` (relative) of the reference's all along: the
    ones the loss panel cannot tell apart, with their relative difference in percent."""
    return {
        m: (grid, rel)
        for m, (grid, rel) in relative_difference(curves, reference).items()
        if len(rel) and np.max(np.abs(rel)) <= within * 100
    }


def _draw_differences(ax, curves: Curves, reference: str, x_max: float, x: str) -> None:
    """The difference panel under a loss panel: the methods near the reference, magnified."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    near = near_reference(curves, reference)
    for method, (grid, rel) in near.items():
        j = list(curves).index(method)  # the same colour, marker and line style as in the loss panel
        keep = grid <= x_max * (1 + 1e-9)
        ax.plot(grid[keep], rel[keep], label=method, color=colours[j % len(colours)], **method_style(j))
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_ylabel(f"(L − L_{reference}) / L_{reference} (%)", fontsize=8)
    ax.set_xlabel(AXIS_LABEL[x])
    ax.set_title(
        f"{', '.join(near)} vs {reference}, magnified (within {NEAR:.0%} all along; above 0: {reference} better)",
        fontsize=8,
    )
    ax.grid(alpha=0.3)


def _annotate_close(ax, curves: Curves) -> None:
    """Say in the panel which methods end within 0.1% of each other (their curves overlap)."""
    pairs = close_pairs({m: float(c[1][-1]) for m, c in curves.items()})
    if pairs:
        text = "\n".join(
            f"{a} and {b}: final losses {rel:.3f}% apart (curves overlap)" for a, b, rel in pairs
        )
        ax.text(
            0.02,
            0.03,
            text,
            transform=ax.transAxes,
            fontsize=7,
            va="bottom",
            ha="left",
            bbox={"boxstyle": "round", "fc": "white", "ec": "grey", "alpha": 0.9},
        )


def curves_figure(
    results: dict[str, list[list[dict[str, Any]]]],
    x: str,
    title: str,
    horizon: float | None = None,
    reference: str | None = None,
):
    """The figure ``plot_curves`` saves, and the right end of each column's x axis.

    Mean ± std over seeds of the validation loss along ``x``. On the wall-clock axis, when some method
    (sync, typically) runs more than 1.5x past ``horizon`` (the time the async runs need for the
    budget), a second column zooms on [0, horizon] so the async curves are not squeezed into a
    corner. With a ``reference`` among the methods, a row below magnifies the relative difference to
    it of the methods that stay within 1% of it (``near_reference``): the curves that overlap in the
    loss panel.
    """
    curves = {method: _mean_curve(runs, x) for method, runs in results.items()}
    x_end = max(float(c[0][-1]) for c in curves.values())
    zoom = x == "time" and horizon is not None and x_end > 1.5 * horizon
    ends = [x_end, horizon] if zoom else [x_end]
    diff = reference is not None and reference in curves and bool(near_reference(curves, reference))
    rows = 2 if diff else 1
    fig, axes = plt.subplots(
        rows,
        len(ends),
        figsize=(6.5 * len(ends), 6.8 if diff else 4.5),
        squeeze=False,
        sharex="col",
        gridspec_kw={"height_ratios": [2.2, 1] if diff else [1]},
    )
    for col, end in enumerate(ends):
        ax = axes[0, col]
        _draw_curves(ax, curves, end)
        ax.set_ylabel(LOSS_LABEL)
        ax.set_xlabel(AXIS_LABEL[x])
        if col == 1:
            ax.set_xlim(0, horizon * 1.02)
            ax.set_title(f"zoom on 0 - {horizon:.0f} s, the equal wall-clock point", fontsize=9)
        elif zoom:
            ax.axvline(horizon, color="grey", ls="--", lw=1)
            ax.set_title("whole runs (dashed: equal wall-clock point)", fontsize=9)
        if diff:
            _draw_differences(axes[1, col], curves, reference, end, x)
            ax.tick_params(labelbottom=True)
    axes[0, 0].legend(fontsize=8, loc="upper right")
    _annotate_close(axes[0, 0], curves)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig, ends


def plot_curves(
    results: dict[str, list[list[dict[str, Any]]]],
    x: str,
    path: Path,
    title: str,
    horizon: float | None = None,
    reference: str | None = None,
) -> list[float]:
    """Save ``curves_figure`` to ``path``; returns the right end of each column's x axis."""
    fig, ends = curves_figure(results, x, title, horizon, reference)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ends


def languages_figure(
    finals: dict[str, list[dict[str, Any]]], languages: list[str], title: str, reference: str | None = None
):
    """Final loss per language: bars from zero (left), and with a ``reference`` each method's relative
    difference to it per language (right), which is where the methods differ. Legend outside."""
    methods = list(finals)
    means = {m: np.array([[r[f"val_loss/{lang}"] for lang in languages] for r in finals[m]]) for m in methods}
    diff = reference is not None and reference in finals and len(methods) > 1
    fig, axes = plt.subplots(1, 2 if diff else 1, figsize=(12 if diff else 7.5, 4.8), squeeze=False)
    width = 0.8 / len(methods)
    x = np.arange(len(languages))
    offsets = {m: x + (i - (len(methods) - 1) / 2) * width for i, m in enumerate(methods)}
    ax = axes[0, 0]
    for i, m in enumerate(methods):
        values = means[m]
        ax.bar(
            offsets[m],
            values.mean(0),
            width,
            yerr=values.std(0) if len(values) > 1 else None,
            label=m,
            hatch=HATCHES[i % len(HATCHES)],
            edgecolor="white",
            lw=0,
        )
    ax.set_ylim(0, max(v.max() for v in means.values()) * 1.08)
    ax.set_xticks(x, languages)
    ax.set_xlabel("validation language")
    ax.set_ylabel("final validation loss (bars from 0)")
    ax.set_title("final loss per language", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if diff:
        ax = axes[0, 1]
        ref = means[reference].mean(0)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, m in enumerate(methods):
            if m == reference:
                continue
            rel = (means[m].mean(0) - ref) / ref * 100
            bars = ax.bar(
                offsets[m],
                rel,
                width,
                color=colours[i % len(colours)],
                hatch=HATCHES[i % len(HATCHES)],
                edgecolor="white",
                lw=0,
            )
            ax.bar_label(bars, fmt="%+.2f", fontsize=6, padding=1)  # a bar too small to see still reads
        ax.axhline(0.0, color="grey", lw=1)
        ax.margins(y=0.08)
        ax.set_xticks(x, languages)
        ax.set_xlabel("validation language")
        ax.set_ylabel(f"(L − L_{reference}) / L_{reference} (%)")
        ax.set_title(f"difference to {reference} (above 0: {reference} is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_languages(
    finals: dict[str, list[dict[str, Any]]],
    languages: list[str],
    path: Path,
    title: str,
    reference: str | None = None,
) -> None:
    """Save ``languages_figure`` to ``path``."""
    fig = languages_figure(finals, languages, title, reference)
    fig.savefig(path, dpi=120)
    plt.close(fig)


FINAL_METRICS = ("val_loss/mean", "val_accuracy/mean", "val_perplexity/mean")


def mean_std(values: list[float]) -> str:
    """ "m ± s" over seeds, or the single value when there is one seed."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def paired_improvement(losses: dict[int, float], reference: dict[int, float]) -> list[float]:
    """(L_base − L_ref)/L_base in percent, per seed present in both (positive: the reference is better)."""
    return [(losses[s] - reference[s]) / losses[s] * 100 for s in sorted(set(losses) & set(reference))]


def results_table(
    at_tokens: dict[str, dict[int, float]],
    at_time: dict[str, dict[int, float]],
    reference: str,
) -> str:
    """Markdown: loss per method at equal tokens and at equal wall-clock (mean ± std over seeds), and the
    reference method's relative improvement (L_base − L_ref)/L_base over each, paired by seed."""
    lines = [
        f"| method | loss @ equal tokens | loss @ equal wall-clock | {reference} vs method @ tokens "
        f"| {reference} vs method @ wall-clock |",
        "|---|---|---|---|---|",
    ]
    for method in at_tokens:
        cells = [method, mean_std(list(at_tokens[method].values())), mean_std(list(at_time[method].values()))]
        for table in (at_tokens, at_time):
            if method == reference or reference not in table:
                cells.append("—")
                continue
            rel = paired_improvement(table[method], table[reference])
            paired = sorted(set(table[method]) & set(table[reference]))
            if not rel:
                cells.append("no common seed")
            elif len(rel) == 1:
                cells.append(f"{rel[0]:+.2f}% (seed {paired[0]} only)")
            else:
                cells.append(f"{np.mean(rel):+.2f}% (per seed {', '.join(f'{r:+.2f}' for r in rel)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(
    runs: dict[str, dict[int, Path]], out_dir: Path, wallclock: float, reference: str, title: str
) -> str:
    """Write loss_vs_tokens.png, loss_vs_time.png, loss_per_language.png and results.md into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    evals = {m: {s: read_evals(p) for s, p in seeds.items()} for m, seeds in runs.items()}
    plot_curves(
        {m: list(v.values()) for m, v in evals.items()},
        "tokens",
        out_dir / "loss_vs_tokens.png",
        title,
        reference=reference,
    )
    plot_curves(
        {m: list(v.values()) for m, v in evals.items()},
        "time",
        out_dir / "loss_vs_time.png",
        title,
        horizon=wallclock,
        reference=reference,
    )
    finals = {m: [final_eval(e) for e in v.values()] for m, v in evals.items()}
    languages = [
        k.split("/", 1)[1]
        for k in next(iter(finals.values()))[0]
        if k.startswith("val_loss/") and k != "val_loss/mean"
    ]
    plot_languages(finals, languages, out_dir / "loss_per_language.png", title, reference)
    at_tokens = {m: {s: final_eval(e)["val_loss/mean"] for s, e in v.items()} for m, v in evals.items()}
    at_time = {
        m: {s: eval_at_time(e, wallclock)["val_loss/mean"] for s, e in v.items()} for m, v in evals.items()
    }
    per_language = defaultdict(dict)
    for m, rs in finals.items():
        for lang in languages:
            per_language[m][lang] = float(np.mean([r[f"val_loss/{lang}"] for r in rs]))
    table = results_table(at_tokens, at_time, reference)
    metrics_table = "| method | loss | token accuracy | perplexity |\n|---|---|---|---|\n" + "".join(
        f"| {m} | "
        + " | ".join(mean_std([r.get(key, float("nan")) for r in rs]) for key in FINAL_METRICS)
        + " |\n"
        for m, rs in finals.items()
    )
    lang_table = "| method | " + " | ".join(languages) + " |\n|---|" + "---|" * len(languages) + "\n"
    for m, v in per_language.items():
        lang_table += f"| {m} | " + " | ".join(f"{v[lang]:.4f}" for lang in languages) + " |\n"
    text = (
        f"# {title}\n\nEqual wall-clock = {wallclock:.1f} virtual seconds (when the async runs reach the token "
        f"budget). Lower is better; improvement = (L_method − L_{reference}) / L_method.\n\n{table}\n\n"
        "Final evaluation on the pooled validation set (equal shares of every language; mean ± std "
        f"over seeds):\n\n{metrics_table}\n"
        f"Final validation loss per language (mean over seeds):\n\n{lang_table}\n"
        "![loss vs tokens](loss_vs_tokens.png)\n![loss vs wall-clock](loss_vs_time.png)\n"
        "![loss per language](loss_per_language.png)\n"
    )
    (out_dir / "results.md").write_text(text)
    return text
