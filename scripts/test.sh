#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv, dependencies, vLLM (CPU build), lint, tests.
# Apache Kafka is fetched from Maven Central and started by the test session itself.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh dev
scripts/install-vllm.sh
scripts/install-encoder.sh   # the predictor's optional encoder tier (tests/test_predictor_encoder.py)
. .venv/bin/activate
echo "== ruff" && ruff check .
echo "== mypy" && mypy goodserve/ schemas/ dispatcher/ workers/ monitor/
scripts/install-chromium.sh || echo "test.sh: no Chromium: tests/test_report.py will fail" >&2  # renders the report page
echo "== pytest"
exec python -m pytest -q "$@"
