#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install GoodServe into it, editable, with the given extras.
# Usage: scripts/bootstrap.sh [EXTRAS]   e.g. scripts/bootstrap.sh dev   (default: embedded)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-embedded}"
PY=""
for c in python3.11 python3.12 python3.13 python3; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PY="$c"; break
  fi
done
[ -n "$PY" ] || { echo "bootstrap: need Python >= 3.11" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
if [ ! -x .venv/bin/uv ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check uv
fi
STAMP=".venv/.goodserve-$EXTRAS-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "bootstrap: installing goodserve[$EXTRAS]" >&2
  VIRTUAL_ENV="$PWD/.venv" .venv/bin/uv pip install -q -e ".[$EXTRAS]"
  touch "$STAMP"
fi
