"""Tables and plots for docs/results.md from finished comparison directories.

    python recipes/report.py sweep outputs/results/lr_sweep docs/results/lr_sweep      # method × lr table + heat map
    python recipes/report.py corrections outputs/severe_noniid docs/results/main        # what the correction did

Labels of the form ``name@lr`` are read as (method, outer lr).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from recipes.plots import final_eval, read_arrivals, read_evals


def finished_runs(compare_dir: Path) -> dict[str, dict[int, Path]]:
    """label → seed → run directory, for runs that finished (summary.json present)."""
    runs: dict[str, dict[int, Path]] = defaultdict(dict)
    for run_dir in sorted((compare_dir / "runs").iterdir()):
        if not (run_dir / "summary.json").exists():
            continue
        label, seed = run_dir.name.rsplit("-seed", 1)
        runs[label][int(seed)] = run_dir
    return runs


def sweep_table(compare_dir: Path, out_dir: Path) -> str:
    """Final mean validation loss for every (method, lr), best per method in bold, and a heat map."""
    runs = finished_runs(compare_dir)
    losses: dict[str, dict[float, float]] = defaultdict(dict)
    for label, seeds in runs.items():
        method, lr = label.rsplit("@", 1)
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


def correction_table(compare_dir: Path, out_dir: Path) -> str:
    """Per corrected method: share of blocks kept / shrunk / reoriented and mean cosine to the momentum,
    over stale (τ > 0) and fresh (τ = 0) arrivals, averaged over seeds; and mean staleness per worker."""
    runs = finished_runs(compare_dir)
    lines = [
        "| method | updates | stale share | kept | shrunk | reoriented | mean cos (stale) | min cos (stale) | mean τ per worker |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, seeds in runs.items():
        arrivals = [r for p in seeds.values() for r in read_arrivals(p)]
        stale = [r for r in arrivals if r["staleness"] > 0 and "correction/mean_cosine" in r]
        per_worker = defaultdict(list)
        for r in arrivals:
            per_worker[r["worker"]].append(r["staleness"])
        tau = ", ".join(f"{np.mean(per_worker[w]):.1f}" for w in sorted(per_worker))
        if not stale:
            lines.append(
                f"| {label} | {len(arrivals)} | {np.mean([r['staleness'] > 0 for r in arrivals]):.2f} "
                f"| — | — | — | — | — | {tau} |"
            )
            continue

        def mean(key: str, rows: list = stale) -> float:
            return float(np.mean([r[key] for r in rows]))

        lines.append(
            f"| {label} | {len(arrivals)} | {len(stale) / len(arrivals):.2f} | {mean('correction/frac_blocks_kept'):.2f} "
            f"| {mean('correction/frac_blocks_shrunk'):.2f} | {mean('correction/frac_blocks_reoriented'):.2f} "
            f"| {mean('correction/mean_cosine'):.3f} | {min(r['correction/min_cosine'] for r in stale):.3f} | {tau} |"
        )
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "corrections.md").write_text(text + "\n")
    return text


def correction_over_time(compare_dir: Path, out_dir: Path, label: str = "heloco") -> None:
    """Cosine between arriving Δ and the momentum, and the share of reoriented blocks, over training."""
    runs = finished_runs(compare_dir).get(label)
    if not runs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for seed, path in runs.items():
        stale = [r for r in read_arrivals(path) if "correction/mean_cosine" in r]
        tokens = [r["tokens"] for r in stale]
        axes[0].scatter(tokens, [r["correction/mean_cosine"] for r in stale], s=8, label=f"seed {seed}")
        axes[1].scatter(
            tokens,
            [r["correction/frac_blocks_reoriented"] + r["correction/frac_blocks_shrunk"] for r in stale],
            s=8,
        )
    axes[0].set_ylabel("mean cos(Δ_b, m_b), stale updates")
    axes[1].set_ylabel("share of blocks corrected")
    for ax in axes:
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "corrections_over_time.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["sweep", "corrections"])
    parser.add_argument("compare_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.what == "sweep":
        print(sweep_table(args.compare_dir, args.out_dir))
    else:
        print(correction_table(args.compare_dir, args.out_dir))
        correction_over_time(args.compare_dir, args.out_dir)


if __name__ == "__main__":
    main()
