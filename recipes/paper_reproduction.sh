#!/usr/bin/env bash
# Rerun every experiment of docs/paper_reproduction.md (about 3 hours on 2 CPU cores; not in CI).
#   bash recipes/paper_reproduction.sh            # everything, in this order
#   bash recipes/paper_reproduction.sh tuning     # one part: moderate | logged | extreme | ablations | tuning
# Finished runs are reused (compare.py refuses a finished run computed with other settings).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
part=${1:-all}
configs=recipes/configs/reproduction

if [[ $part == all || $part == moderate ]]; then
  $PY recipes/analysis/compare.py --config $configs/moderate_noniid.yaml
fi
if [[ $part == all || $part == logged ]]; then
  $PY recipes/analysis/compare.py --config $configs/logged_run_noniid.yaml
fi
if [[ $part == all || $part == extreme ]]; then
  $PY recipes/analysis/compare.py --config $configs/extreme_noniid.yaml
fi
if [[ $part == all || $part == ablations ]]; then
  $PY recipes/analysis/compare.py --config $configs/moderate_noniid_ablations.yaml
fi
if [[ $part == all || $part == tuning ]]; then
  $PY recipes/analysis/compare.py --config $configs/tuning.yaml
  $PY recipes/analysis/report.py sweep outputs/reproduction/tuning docs/paper_reproduction/tuning
fi
