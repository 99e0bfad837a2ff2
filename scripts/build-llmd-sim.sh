#!/usr/bin/env bash
# Build llm-d's vLLM simulator (llm-d-inference-sim, Go) into .cache/llmd-sim/ (git-ignored).
#
# A tiny module imports github.com/llm-d/llm-d-inference-sim/cmd/llm-d-inference-sim at
# the pinned version and builds it through the Go module proxy. Prints the binary's path.
# Used by tests/test_openai_backend.py as a second, independently written
# OpenAI-compatible backend.
set -euo pipefail
VERSION="${LLMD_SIM_VERSION:-v0.10.2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$ROOT/.cache/llmd-sim"
BIN="$DIR/llm-d-inference-sim-$VERSION"
if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$DIR/src"
cd "$DIR/src"
rm -f main.go
# a tools-style import: pins the simulator's command in go.mod without compiling this file
cat > tools.go <<'GO'
//go:build tools

package tools

import _ "github.com/llm-d/llm-d-inference-sim/cmd/llm-d-inference-sim"
GO
if [[ ! -f go.mod ]]; then go mod init goodserve.local/llmdsim >/dev/null 2>&1; fi
go get "github.com/llm-d/llm-d-inference-sim@$VERSION" >&2
go mod tidy >&2
# build the simulator's own main package (the import above pins it in go.mod)
CGO_ENABLED="${CGO_ENABLED:-1}" go build -o "$BIN" github.com/llm-d/llm-d-inference-sim/cmd/llm-d-inference-sim >&2
echo "$BIN"
