#!/usr/bin/env bash
# Rerun every experiment of docs/results.md (hours on 2 CPU cores; not part of CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY recipes/compare.py --config recipes/configs/results/lr_sweep.yaml
$PY recipes/report.py sweep outputs/results/lr_sweep docs/results/lr_sweep
$PY recipes/compare.py --config recipes/configs/results/main.yaml
$PY recipes/report.py corrections outputs/severe_noniid docs/results/main
$PY recipes/compare.py --config recipes/configs/demo.yaml
# HeLoCo hyperparameters (docs/results.md §1):
$PY recipes/compare.py --config recipes/configs/results/heloco_sweep.yaml
$PY recipes/report.py corrections outputs/results/heloco_sweep docs/results/heloco_sweep
