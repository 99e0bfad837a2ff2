#!/usr/bin/env bash
# Rebuild the shipped output-length model (goodserve/data/predictor/) from the public data
# in ../shared/data (or $GOODSERVE_DATA_DIR), then evaluate it on the held-out split, in both
# cases: online (history of earlier requests) and no history at all.
# Deterministic: fixed split seed, fixed xgboost seed, one thread (NTHREAD to change).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
args=()
if [ -n "${GOODSERVE_DATA_DIR:-}" ]; then args+=(--data-dir "$GOODSERVE_DATA_DIR"); fi
python -m goodserve.cli predictor train --out goodserve/data/predictor --nthread "${NTHREAD:-1}" "${args[@]}"
python -m goodserve.cli predictor eval "${args[@]}"
python -m goodserve.cli predictor eval --cold-prompts --history online "${args[@]}"
ls -l goodserve/data/predictor/
du -ch goodserve/data/predictor/* | tail -1
