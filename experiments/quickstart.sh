#!/usr/bin/env bash
# `make quickstart`: the whole pipeline on the embedded tiny model, CPU only, no downloads.
# Each step prints where it wrote its outputs (under outputs/quickstart/).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-outputs/quickstart}
mkdir -p "$OUT"

echo "== 1/5 generate: AR sampling with the shipped tiny model"
"$BIN/hawkspec-generate" hydra.run.dir="$OUT/generate"

echo "== 2/5 cache: hidden states of the tiny model's own samples (self-distillation), train/ + val/ shards"
"$BIN/hawkspec-cache" hydra.run.dir="$OUT/cache" cache.num_samples=640 cache.val_samples=128 cache.shard_size=128

echo "== 3/5 train Medusa heads (horizontal only) -> $OUT/heads/medusa"
"$BIN/hawkspec-train" hydra.run.dir="$OUT/train_medusa" shards_dir="$OUT/cache/shards" heads=medusa \
    data.samples_per_epoch=3200 trainer.max_epochs=3 export_dir="$OUT/heads/medusa"

echo "== 4/5 train Hawk heads (horizontal + vertical) -> $OUT/heads/hawk"
"$BIN/hawkspec-train" hydra.run.dir="$OUT/train_hawk" shards_dir="$OUT/cache/shards" heads=hawk \
    data.samples_per_epoch=3200 trainer.max_epochs=3 export_dir="$OUT/heads/hawk"

echo "== 5/5 compare decoders: AR vs Medusa vs Hawk, same prompts and seeds, batch 1 (latency)"
"$BIN/hawkspec-eval" 'eval.decoders=[ar,medusa,hawk]' eval.num_prompts=4 eval.batch_size=1 eval.repeats=1 \
    paths.heads_dir="$OUT/heads" hydra.run.dir="$OUT/eval"
echo "Table: $OUT/eval/results.md; grids and acceptance heatmaps: $OUT/eval/"
