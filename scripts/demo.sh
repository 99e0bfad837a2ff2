#!/usr/bin/env bash
# Run the GoodServe demo on a fresh machine: venv, dependencies, embedded broker, demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh embedded
exec .venv/bin/goodserve demo "$@"
