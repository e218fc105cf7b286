"""Finished runs of a comparison directory and their final losses at equal tokens and at equal
wall-clock: what the report tables and the leaderboard read."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from recipes.analysis.plots import eval_at_time, final_eval, read_evals

__all__ = ["cell_losses", "finished_runs"]


def finished_runs(compare_dir: Path) -> dict[str, dict[int, Path]]:
    """label → seed → run directory, for runs that finished (summary.json present)."""
    runs: dict[str, dict[int, Path]] = defaultdict(dict)
    for run_dir in sorted((compare_dir / "runs").iterdir()):
        if not (run_dir / "summary.json").exists():
            continue
        label, seed = run_dir.name.rsplit("-seed", 1)
        runs[label][int(seed)] = run_dir
    return runs


def cell_losses(compare_dir: Path) -> dict[str, dict[str, dict[int, float]]]:
    """{"tokens"|"time": {label: {seed: final mean validation loss}}} for one comparison directory; the
    wall-clock point is the one compare.py recorded (the time the async runs need for the budget)."""
    out: dict[str, dict[str, dict[int, float]]] = {"tokens": defaultdict(dict), "time": defaultdict(dict)}
    for label, seeds in finished_runs(compare_dir).items():
        for seed, path in seeds.items():
            evals = read_evals(path)
            times = json.loads((path / "summary.json").read_text())["config"].get("eval_times") or [-1.0]
            out["tokens"][label][seed] = final_eval(evals)["val_loss/mean"]
            out["time"][label][seed] = eval_at_time(evals, times[0])["val_loss/mean"]
    return out
