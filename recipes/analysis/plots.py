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


def _draw_curves(ax, curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], x_max: float) -> None:
    for method, (grid, mean, std) in curves.items():
        keep = grid <= x_max * (1 + 1e-9)
        (line,) = ax.plot(grid[keep], mean[keep], label=method, lw=1.6, marker=".", ms=3)
        ax.fill_between(
            grid[keep], (mean - std)[keep], (mean + std)[keep], alpha=0.15, color=line.get_color()
        )
    ax.grid(alpha=0.3)


def plot_curves(
    results: dict[str, list[list[dict[str, Any]]]],
    x: str,
    path: Path,
    title: str,
    horizon: float | None = None,
) -> list[float]:
    """Mean ± std over seeds of the validation loss along ``x``. On the wall-clock axis, when some method
    (sync, typically) runs more than 1.5x past ``horizon`` (the time the async runs need for the budget),
    a second panel zooms on [0, horizon] so the async curves are not squeezed into a corner. Returns the
    right end of each panel's axis."""
    curves = {method: _mean_curve(runs, x) for method, runs in results.items()}
    x_end = max(float(c[0][-1]) for c in curves.values())
    zoom = x == "time" and horizon is not None and x_end > 1.5 * horizon
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(12 if zoom else 7, 4.5), squeeze=False)
    _draw_curves(axes[0, 0], curves, x_end)
    label = {"tokens": "tokens (DiLoCo phase, all workers)", "time": "virtual wall-clock (s)"}[x]
    axes[0, 0].set_xlabel(label)
    axes[0, 0].set_ylabel("validation loss (mean over languages)")
    axes[0, 0].legend(fontsize=8)
    if zoom:
        axes[0, 0].axvline(horizon, color="grey", ls="--", lw=1)
        axes[0, 0].set_title("whole runs", fontsize=9)
        ax = axes[0, 1]
        _draw_curves(ax, curves, horizon)
        ax.set_xlim(0, horizon * 1.02)
        ax.set_xlabel(label)
        ax.set_title(f"zoom on 0 - {horizon:.0f} s, the equal wall-clock point", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [x_end, horizon] if zoom else [x_end]


def plot_languages(
    finals: dict[str, list[dict[str, Any]]], languages: list[str], path: Path, title: str
) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    methods = list(finals)
    width = 0.8 / len(methods)
    x = np.arange(len(languages))
    for i, method in enumerate(methods):
        values = np.array([[r[f"val_loss/{lang}"] for lang in languages] for r in finals[method]])
        ax.bar(
            x + i * width,
            values.mean(0),
            width,
            yerr=values.std(0) if len(values) > 1 else None,
            label=method,
        )
    ax.set_xticks(x + width * (len(methods) - 1) / 2, languages)
    lows = [r[f"val_loss/{lang}"] for rs in finals.values() for r in rs for lang in languages]
    ax.set_ylim(min(lows) * 0.97, max(lows) * 1.02)
    ax.set_ylabel("final validation loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
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
            cells.append(
                f"{np.mean(rel):+.2f}%"
                + (f" (per seed {', '.join(f'{r:+.2f}' for r in rel)})" if len(rel) > 1 else "")
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(
    runs: dict[str, dict[int, Path]], out_dir: Path, wallclock: float, reference: str, title: str
) -> str:
    """Write loss_vs_tokens.png, loss_vs_time.png, loss_per_language.png and results.md into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    evals = {m: {s: read_evals(p) for s, p in seeds.items()} for m, seeds in runs.items()}
    plot_curves(
        {m: list(v.values()) for m, v in evals.items()}, "tokens", out_dir / "loss_vs_tokens.png", title
    )
    plot_curves(
        {m: list(v.values()) for m, v in evals.items()},
        "time",
        out_dir / "loss_vs_time.png",
        title,
        horizon=wallclock,
    )
    finals = {m: [final_eval(e) for e in v.values()] for m, v in evals.items()}
    languages = [
        k.split("/", 1)[1]
        for k in next(iter(finals.values()))[0]
        if k.startswith("val_loss/") and k != "val_loss/mean"
    ]
    plot_languages(finals, languages, out_dir / "loss_per_language.png", title)
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
