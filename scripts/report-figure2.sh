#!/usr/bin/env bash
# The Figure 2 scenario (Llama-2-7B on V100/A40/A800/H800, 100 input tokens, 100-500 output
# tokens, 6 s SLO) at 10/20/30 RPS for several policies, then `goodserve report` on it all.
# Usage: scripts/report-figure2.sh [OUT_DIR] ; env: POLICIES, LOADS, N
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-reports/figure2}"
POLICIES="${POLICIES:-goodserve,goodserve-nomigrate,fastest-first,least-request,round-robin}"
LOADS="${LOADS:-10 20 30}"
N="${N:-600}"
[ -x .venv/bin/goodserve ] && PATH="$PWD/.venv/bin:$PATH"
mkdir -p "$OUT/runs"
SIMS=()
for R in $LOADS; do
  goodserve trace synth --out "$OUT/runs/trace-$R.jsonl" --n "$N" --rps "$R" \
    --input-tokens 100 --output-tokens 100:500 --slo-s 6 --seed 0
  goodserve simulate --fleet figure2 --trace "$OUT/runs/trace-$R.jsonl" --policy "$POLICIES" \
    --keep-requests --quiet --out "$OUT/runs/sim-$R.json" >/dev/null
  SIMS+=("$R=$OUT/runs/sim-$R.json")
done
goodserve report --sim "${SIMS[@]}" --out "$OUT" --title "GoodServe: Figure 2 scenario"
