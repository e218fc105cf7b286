#!/usr/bin/env bash
# Rerun every experiment of docs/results.md (about 4 hours on 2 CPU cores; not part of CI).
#   bash recipes/results.sh            # everything, in the order of docs/results.md
#   bash recipes/results.sh grid       # one part: lr | hparams | main | grid | slow_workers
# Finished runs are reused (compare.py refuses a finished run computed with other settings).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
part=${1:-all}

if [[ $part == all || $part == lr ]]; then
  $PY recipes/analysis/compare.py --config recipes/configs/results/lr_sweep.yaml
  $PY recipes/analysis/report.py sweep outputs/results/lr_sweep docs/results/lr_sweep
fi
if [[ $part == all || $part == hparams ]]; then
  for sweep in heloco_sweep heloco_sweep_conflict; do
    $PY recipes/analysis/compare.py --config recipes/configs/results/$sweep.yaml
    $PY recipes/analysis/report.py corrections outputs/results/$sweep docs/results/$sweep
  done
fi
if [[ $part == all || $part == main ]]; then
  $PY recipes/analysis/compare.py --config recipes/configs/results/main.yaml
  $PY recipes/analysis/report.py corrections outputs/severe_noniid docs/results/main
  $PY recipes/analysis/compare.py --config recipes/configs/demo.yaml
fi
if [[ $part == all || $part == grid ]]; then
  for config in recipes/configs/results/grid/*.yaml; do
    $PY recipes/analysis/compare.py --config "$config"
  done
  $PY recipes/analysis/report.py grid outputs/results/grid docs/results/grid
fi
if [[ $part == all || $part == slow_workers ]]; then
  for config in recipes/configs/results/slow_workers/*.yaml; do
    $PY recipes/analysis/compare.py --config "$config"
  done
  $PY recipes/analysis/report.py slow_workers outputs/results/slow_workers docs/results/slow_workers
fi
