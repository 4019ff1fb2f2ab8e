#!/usr/bin/env bash
# `make quickstart`: the whole pipeline on the embedded tiny model, CPU only, no downloads.
# Each step prints where it wrote its outputs (under outputs/quickstart/).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-outputs/quickstart}
mkdir -p "$OUT"

echo "== 1/1 generate: AR sampling with the shipped tiny model"
"$BIN/hawkspec-generate" hydra.run.dir="$OUT/generate"
