"""Tables and plots for docs/results.md from finished comparison directories.

    python recipes/analysis/report.py sweep outputs/results/lr_sweep docs/results/lr_sweep      # method × lr table + heat map
    python recipes/analysis/report.py corrections outputs/severe_noniid docs/results/main        # what the correction did
    python recipes/analysis/report.py grid outputs/results/grid docs/results/grid                # heterogeneity × data matrix
    python recipes/analysis/report.py slow_workers outputs/results/slow_workers docs/results/slow_workers  # heat maps
    python recipes/analysis/report.py along outputs/reproduction/moderate_noniid docs/paper_reproduction/moderate_noniid  # heloco vs mla per eval
    python recipes/analysis/report.py leaderboard outputs/reproduction/leaderboard docs/paper_reproduction/leaderboard  # ranks per cell

Labels of the form ``name@lr`` are read as (method, outer lr).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from recipes.analysis.cells import cell_losses, finished_runs
from recipes.analysis.leaderboard import leaderboard_table
from recipes.analysis.plots import (
    final_eval,
    mean_std,
    paired_improvement,
    read_arrivals,
    read_evals,
)
from recipes.cli import UserError, run_cli


def run_outer_lr(run_dir: Path) -> float:
    """The outer learning rate a finished run used (its summary's effective value)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return float(summary.get("outer_lr", summary["config"].get("outer_lr")))


def sweep_table(compare_dir: Path, out_dir: Path) -> str:
    """Final mean validation loss for every (method, lr), best per method in bold, and a heat map. A
    label ``name@lr`` gives both; a plain label is the method at the outer lr its runs used."""
    runs = finished_runs(compare_dir)
    losses: dict[str, dict[float, float]] = defaultdict(dict)
    for label, seeds in runs.items():
        method, lr = (
            label.rsplit("@", 1) if "@" in label else (label, run_outer_lr(next(iter(seeds.values()))))
        )
        losses[method][float(lr)] = float(
            np.mean([final_eval(read_evals(p))["val_loss/mean"] for p in seeds.values()])
        )
    grid = sorted({lr for v in losses.values() for lr in v})
    lines = [
        "| method | " + " | ".join(f"η={lr:g}" for lr in grid) + " | best η |",
        "|---|" + "---|" * (len(grid) + 1),
    ]
    for method, by_lr in losses.items():
        best = min(by_lr, key=by_lr.get)
        cells = [
            f"**{by_lr[lr]:.4f}**" if lr == best else (f"{by_lr[lr]:.4f}" if lr in by_lr else "—")
            for lr in grid
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {best:g} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = np.array([[losses[m].get(lr, np.nan) for lr in grid] for m in losses])
    fig, ax = plt.subplots(figsize=(1.3 * len(grid) + 2, 0.5 * len(losses) + 1.5))
    image = ax.imshow(matrix, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(grid)), [f"{lr:g}" for lr in grid])
    ax.set_yticks(range(len(losses)), list(losses))
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize=8, color="w")
    ax.set_xlabel("outer learning rate")
    fig.colorbar(image, label="final validation loss")
    fig.tight_layout()
    fig.savefig(out_dir / "lr_sweep.png", dpi=120)
    plt.close(fig)
    text = "\n".join(lines)
    (out_dir / "lr_sweep.md").write_text(text + "\n\n![lr sweep](lr_sweep.png)\n")
    return text


STAT_COLUMNS = {
    "tensors corrected": "correction/frac_blocks_corrected",
    "shrunk": "correction/frac_blocks_shrunk",
    "reoriented": "correction/frac_blocks_reoriented",
    "mean λ": "correction/mean_lambda",
    "mean β": "correction/mean_beta",
    "mean cos": "correction/mean_cosine",
    "relative change": "correction/mean_relative_change",
}


def correction_table(compare_dir: Path, out_dir: Path) -> str:
    """Per corrected method, over fresh (τ = 0), stale (τ > 0) and all arrivals pooled over seeds: how many,
    the share of blocks (tensors) the correction touched, mean λ and β (over all blocks, an untouched one
    counting 0, as the authors' logs average them), mean cosine to the momentum and the relative size of
    the change; and the mean staleness of each worker."""
    runs = finished_runs(compare_dir)
    lines = [
        "| method | arrivals | mean τ per worker | kind | share | " + " | ".join(STAT_COLUMNS) + " |",
        "|---|---|---|---|---|" + "---|" * len(STAT_COLUMNS),
    ]
    for label, seeds in runs.items():
        arrivals = [r for p in seeds.values() for r in read_arrivals(p)]
        per_worker = defaultdict(list)
        for r in arrivals:
            per_worker[r["worker"]].append(r["staleness"])
        tau = ", ".join(f"{np.mean(per_worker[w]):.1f}" for w in sorted(per_worker))
        corrected = [r for r in arrivals if "correction/mean_cosine" in r]
        if not corrected:
            continue
        for kind, rows in (
            ("fresh", [r for r in corrected if r["staleness"] == 0]),
            ("stale", [r for r in corrected if r["staleness"] > 0]),
            ("all", corrected),
        ):
            if not rows:
                continue
            cells = [f"{np.mean([r.get(key, np.nan) for r in rows]):.3f}" for key in STAT_COLUMNS.values()]
            lines.append(
                f"| {label} | {len(arrivals)} | {tau} | {kind} | {len(rows) / len(arrivals):.2f} | "
                + " | ".join(cells)
                + " |"
            )
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "corrections.md").write_text(
        text + "\n\n![corrections over training](corrections_over_time.png)\n"
    )
    return text


def correction_over_time(compare_dir: Path, out_dir: Path, label: str = "heloco") -> None:
    """Share of tensors corrected, mean λ, mean β and mean cosine per arrival along training, fresh
    arrivals (τ = 0) and stale ones apart, every seed of ``label``."""
    runs = finished_runs(compare_dir).get(label)
    if not runs:
        return
    panels = ["tensors corrected", "mean λ", "mean β", "mean cos"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    corrected = [r for path in runs.values() for r in read_arrivals(path) if "correction/mean_cosine" in r]
    for kind, marker, color in (("fresh", "o", "tab:blue"), ("stale", "^", "tab:red")):
        rows = [r for r in corrected if (r["staleness"] > 0) == (kind == "stale")]
        for ax, panel in zip(axes, panels, strict=True):
            key = STAT_COLUMNS[panel]
            ax.scatter(
                [r["tokens"] for r in rows],
                [r.get(key, np.nan) for r in rows],
                s=9,
                marker=marker,
                color=color,
                alpha=0.6,
                label=f"{kind} (τ {'> 0' if kind == 'stale' else '= 0'})",
            )
    for ax, panel in zip(axes, panels, strict=True):
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{label}: the correction per arrival over training ({len(runs)} seeds)", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "corrections_over_time.png", dpi=120)
    plt.close(fig)


def _heatmap(ax, matrix: np.ndarray, rows: list[str], cols: list[str], title: str, fmt: str, **kw) -> None:
    image = ax.imshow(matrix, aspect="auto", **kw)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, format(matrix[i, j], fmt), ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    plt.colorbar(image, ax=ax, fraction=0.046)


def _improvement_heatmap(ax, matrix: np.ndarray, rows: list[str], cols: list[str], title: str) -> None:
    """Relative improvements in %, on a diverging scale centred at 0 (blue: the reference is better)."""
    limit = np.nanmax(np.abs(matrix)) if np.isfinite(matrix).any() else 1.0
    _heatmap(ax, matrix, rows, cols, title, "+.2f", cmap="RdBu", vmin=-limit, vmax=limit)


def grid_table(grid_dir: Path, out_dir: Path, reference: str = "heloco") -> str:
    """The heterogeneity × data matrix: loss per method and cell (mean ± std over seeds) and the
    reference's paired relative improvement over each baseline, at equal tokens and equal wall-clock."""
    order = ("homogeneous", "moderate", "severe")  # cells named <heterogeneity>_<data>, mildest first
    cells = sorted(
        (d.name for d in grid_dir.iterdir() if (d / "runs").is_dir()),
        key=lambda name: (
            order.index(name.split("_")[0]) if name.split("_")[0] in order else len(order),
            name,
        ),
    )
    losses = {cell: cell_losses(grid_dir / cell) for cell in cells}
    methods = list(dict.fromkeys(m for c in cells for m in losses[c]["tokens"]))
    baselines = [m for m in methods if m != reference]
    if not baselines or not any(reference in losses[c]["tokens"] for c in cells):
        raise UserError(f"{grid_dir}: the matrix needs finished runs of {reference!r} and of a baseline")
    lines = []
    for budget, name in (("tokens", "equal tokens"), ("time", "equal wall-clock")):
        lines += [f"Final validation loss at {name} (mean ± std over seeds):", ""]
        lines += ["| method | " + " | ".join(cells) + " |", "|---|" + "---|" * len(cells)]
        for m in methods:
            row = [losses[c][budget].get(m, {}) for c in cells]
            lines.append(
                f"| {m} | " + " | ".join(mean_std(list(v.values())) if v else "—" for v in row) + " |"
            )
        lines += [
            "",
            f"{reference} vs each baseline at {name}, (L_base − L_{reference})/L_base paired by seed "
            f"(seeds where {reference} is better by more than 0.001% / seeds):",
            "",
        ]
        lines += ["| baseline | " + " | ".join(cells) + " |", "|---|" + "---|" * len(cells)]
        for b in baselines:
            cells_text = []
            for c in cells:
                rel = paired_improvement(losses[c][budget].get(b, {}), losses[c][budget].get(reference, {}))
                cells_text.append(
                    f"{np.mean(rel):+.2f}% ({sum(r > 1e-3 for r in rel)}/{len(rel)})" if rel else "—"
                )
            lines.append(f"| {b} | " + " | ".join(cells_text) + " |")
        lines.append("")
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(baselines) + 2.2))
    for ax, (budget, name) in zip(
        axes, (("tokens", "equal tokens"), ("time", "equal wall-clock")), strict=True
    ):
        matrix = np.array(
            [
                [
                    np.mean(
                        paired_improvement(losses[c][budget].get(b, {}), losses[c][budget].get(reference, {}))
                        or [np.nan]
                    )
                    for c in cells
                ]
                for b in baselines
            ]
        )
        _improvement_heatmap(
            ax, matrix, baselines, cells, f"{reference} improvement over baseline (%), {name}"
        )
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "grid_improvement.png", dpi=120)
    plt.close(fig)
    text = "\n".join(lines)
    (out_dir / "grid.md").write_text(text + "\n![improvement](grid_improvement.png)\n")
    return text


def _or_dash(x: float, template: str) -> str:
    """A table cell: ``template.format(x)``, or "—" for a cell that was not run."""
    return template.format(x) if np.isfinite(x) else "—"


def slow_worker_table(slow_dir: Path, out_dir: Path, reference: str = "heloco") -> str:
    """Number of slow workers × slowdown: final loss per method (seed-mean) at equal tokens, and the
    reference's improvement over each baseline, as markdown and heat maps."""
    cells = {}
    for d in sorted(slow_dir.iterdir()):
        if (d / "runs").is_dir() and d.name.startswith("n") and "_s" in d.name:
            n, s = d.name[1:].split("_s")
            cells[(int(n), int(s))] = cell_losses(d)
    if not cells:
        raise UserError(f"{slow_dir}: no finished cells named n<slow workers>_s<slowdown> (e.g. n2_s4)")
    counts = sorted({n for n, _ in cells})
    slowdowns = sorted({s for _, s in cells})
    methods = list(dict.fromkeys(m for c in cells.values() for m in c["tokens"]))

    def value(n: int, s: int, m: str, budget: str) -> float:
        v = cells.get((n, s), {}).get(budget, {}).get(m, {})
        return float(np.mean(list(v.values()))) if v else np.nan

    def improvement(n: int, s: int, b: str, budget: str) -> float:
        c = cells.get((n, s))
        rel = paired_improvement(c[budget].get(b, {}), c[budget].get(reference, {})) if c else []
        return float(np.mean(rel)) if rel else np.nan

    rows = [f"{n} slow" for n in counts]
    cols = [f"{s}× slower" for s in slowdowns]
    lines = [
        "Final validation loss at equal tokens (rows: slow workers out of 5; columns: their slowdown):",
        "",
    ]
    lines += ["| method | slow workers | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for m in methods:
        for n in counts:
            lines.append(
                f"| {m} | {n} | "
                + " | ".join(_or_dash(value(n, s, m, "tokens"), "{:.4f}") for s in slowdowns)
                + " |"
            )
    baselines = [m for m in methods if m != reference]
    lines += [
        "",
        f"{reference} vs baseline, (L_base − L_{reference})/L_base at equal tokens / at equal wall-clock:",
        "",
    ]
    lines += ["| baseline | slow workers | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for b in baselines:
        for n in counts:
            lines.append(
                f"| {b} | {n} | "
                + " | ".join(
                    f"{_or_dash(improvement(n, s, b, 'tokens'), '{:+.2f}%')} / {_or_dash(improvement(n, s, b, 'time'), '{:+.2f}%')}"
                    for s in slowdowns
                )
                + " |"
            )
    fig, axes = plt.subplots(
        2, max(len(methods), len(baselines)), figsize=(4.2 * max(len(methods), len(baselines)), 7)
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, m in enumerate(methods):
        ax = axes[0, i]
        ax.axis("on")
        matrix = np.array([[value(n, s, m, "tokens") for s in slowdowns] for n in counts])
        _heatmap(ax, matrix, rows, cols, f"{m}: loss, equal tokens", ".3f", cmap="viridis_r")
    for i, b in enumerate(baselines):
        ax = axes[1, i]
        ax.axis("on")
        budget = "time" if b == "sync" else "tokens"
        matrix = np.array([[improvement(n, s, b, budget) for s in slowdowns] for n in counts])
        where = "wall-clock" if budget == "time" else "tokens"
        _improvement_heatmap(ax, matrix, rows, cols, f"{reference} vs {b} (%), equal {where}")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "slow_workers.png", dpi=120)
    plt.close(fig)
    text = "\n".join(lines)
    (out_dir / "slow_workers.md").write_text(text + "\n\n![slow workers](slow_workers.png)\n")
    return text


def along_table(compare_dir: Path, out_dir: Path, reference: str = "heloco", baseline: str = "mla") -> str:
    """``reference`` vs ``baseline`` at every evaluation both runs of a seed made (same token counts),
    as (L_base − L_ref)/L_base in percent: where along training one method gains or loses."""
    runs = finished_runs(compare_dir)
    missing = [label for label in (reference, baseline) if label not in runs]
    if missing:
        raise UserError(f"{compare_dir}: no finished runs labelled {missing}; found {sorted(runs)}")
    lines = []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for seed in sorted(set(runs[reference]) & set(runs[baseline])):
        losses = [
            {r["tokens"]: r["val_loss/mean"] for r in read_evals(runs[m][seed]) if r["reason"] != "time"}
            for m in (baseline, reference)
        ]
        tokens = sorted(set(losses[0]) & set(losses[1]))
        rel = [(losses[0][t] - losses[1][t]) / losses[0][t] * 100 for t in tokens]
        ax.plot([t / 1e6 for t in tokens], rel, marker=".", label=f"seed {seed}")
        if not lines:
            lines = [
                "| seed | " + " | ".join(f"{t / 1000:g}k" for t in tokens) + " |",
                "|---|" + "---|" * len(tokens),
            ]
        lines.append(f"| {seed} | " + " | ".join(f"{r:+.2f}" for r in rel) + " |")
    text = f"{reference} vs {baseline} (%) at each evaluation (tokens):\n\n" + "\n".join(lines)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel(f"(L_{baseline} − L_{reference}) / L_{baseline}, %")
    ax.set_title(f"{reference} vs {baseline} along the run (above 0: {reference} is better)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"{reference}_vs_{baseline}_along.png", dpi=120)
    plt.close(fig)
    (out_dir / f"{reference}_vs_{baseline}_along.md").write_text(
        text + f"\n\n![along the run]({reference}_vs_{baseline}_along.png)\n"
    )
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "what", choices=["sweep", "corrections", "grid", "slow_workers", "along", "leaderboard"]
    )
    parser.add_argument("compare_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.what == "sweep":
        print(sweep_table(args.compare_dir, args.out_dir))
    elif args.what == "grid":
        print(grid_table(args.compare_dir, args.out_dir))
    elif args.what == "slow_workers":
        print(slow_worker_table(args.compare_dir, args.out_dir))
    elif args.what == "along":
        print(along_table(args.compare_dir, args.out_dir))
    elif args.what == "leaderboard":
        print(leaderboard_table(args.compare_dir, args.out_dir))
    else:
        print(correction_table(args.compare_dir, args.out_dir))
        correction_over_time(args.compare_dir, args.out_dir)


if __name__ == "__main__":
    run_cli(main)
