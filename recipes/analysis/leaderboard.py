"""The leaderboard: every method × cell at equal tokens and at equal wall-clock, with ranks (issue 18).

python recipes/analysis/report.py leaderboard outputs/reproduction/leaderboard docs/paper_reproduction/leaderboard
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from recipes.analysis.cells import cell_losses
from recipes.analysis.plots import mean_std
from recipes.cli import UserError

__all__ = ["leaderboard_table", "ranks"]


def ranks(means: dict[str, float]) -> dict[str, int]:
    """1 for the lowest loss, 2 for the next, ...; ties share the better rank."""
    ordered = sorted(means.values())
    return {label: ordered.index(value) + 1 for label, value in means.items()}


def leaderboard_table(root: Path, out_dir: Path) -> str:
    """Every method × cell at equal tokens and at equal wall-clock: loss (mean ± std over seeds) and its
    rank among the methods of that column, rows ordered by mean rank. Only methods run in every cell
    with every seed of that cell are ranked (a method missing a seed would be compared on fewer)."""
    cells = sorted(d.name for d in root.iterdir() if (d / "runs").is_dir())
    if not cells:
        raise UserError(f"{root}: no cell directories with runs/ inside")
    losses = {cell: cell_losses(root / cell) for cell in cells}
    seeds = {cell: set().union(*losses[cell]["tokens"].values()) for cell in cells}
    methods = [
        m
        for m in dict.fromkeys(m for c in cells for m in losses[c]["tokens"])
        if all(set(losses[c]["tokens"].get(m, {})) == seeds[c] for c in cells)
    ]
    if not methods:
        raise UserError(f"{root}: no method has finished every seed of every cell ({cells})")
    columns = [(c, b) for c in cells for b in ("tokens", "time")]
    means = {
        col: {m: float(np.mean(list(losses[col[0]][col[1]][m].values()))) for m in methods} for col in columns
    }
    rank = {col: ranks(means[col]) for col in columns}
    mean_rank = {m: float(np.mean([rank[col][m] for col in columns])) for m in methods}
    order = sorted(methods, key=lambda m: (mean_rank[m], m))
    names = {"tokens": "equal tokens", "time": "equal wall-clock"}
    lines = [
        "| method | " + " | ".join(f"{c}, {names[b]}" for c, b in columns) + " | mean rank |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for m in order:
        row = [f"{mean_std(list(losses[c][b][m].values()))} ({rank[(c, b)][m]})" for c, b in columns]
        lines.append(f"| {m} | " + " | ".join(row) + f" | {mean_rank[m]:.1f} |")
    skipped = sorted({m for c in cells for m in losses[c]["tokens"]} - set(methods))
    text = "\n".join(lines)
    if skipped:
        text += f"\n\nNot ranked (missing a cell or a seed): {', '.join(skipped)}."
    fig, axes = plt.subplots(
        1, len(columns), figsize=(3.6 * len(columns), 0.42 * len(order) + 1.6), sharey=True
    )
    for ax, col in zip(np.atleast_1d(axes), columns, strict=True):
        for y, m in enumerate(order):
            values = list(losses[col[0]][col[1]][m].values())
            ax.plot(values, [y] * len(values), "o", color="0.6", markersize=4)
            ax.plot([np.mean(values)], [y], "D", color="C3" if rank[col][m] == 1 else "C0")
        ax.set_title(f"{col[0]}, {names[col[1]]}", fontsize=10)
        ax.set_xlabel("pooled validation loss (lower is better)")
        ax.grid(axis="x", alpha=0.3)
    np.atleast_1d(axes)[0].set_yticks(range(len(order)), order)
    np.atleast_1d(axes)[0].invert_yaxis()
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "leaderboard.png", dpi=120)
    plt.close(fig)
    (out_dir / "leaderboard.md").write_text(
        "Loss (mean ± std over seeds) and rank (1 = lowest) per column; grey dots are seeds, the diamond "
        "their mean (red: the column's best).\n\n" + text + "\n\n![leaderboard](leaderboard.png)\n"
    )
    return text
