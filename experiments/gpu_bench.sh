#!/usr/bin/env bash
# The benchmarks on a CUDA machine, from a bare checkout (no install): every decoder preset vs AR at batch 1
# and 8, our AR vs transformers' generate, and Hawk tree sizes. Outputs under outputs/gpu_*, and their tables
# and JSON packed into ${OUT:-outputs}/gpu_results.tgz.
#   PYTHONPATH=src bash experiments/gpu_bench.sh        (needs hydra-core, omegaconf, lightning, transformers)
set -euo pipefail
O=outputs
mkdir -p $O
trap 'tar czf ${OUT:-outputs}/gpu_results.tgz $(find $O -maxdepth 2 -path "$O/gpu_*" \( -name "*.json" -o -name "*.md" -o -name "*.txt" -o -name "grid_*.png" \) )' EXIT
EVAL="python3 -m hawkspec.cli.eval device=cuda logger=none"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$O/gpu_device.txt"
$EVAL 'eval.decoders=[ar,sjd]' eval.num_prompts=2 eval.repeats=1 hydra.run.dir=/tmp/smoke > /dev/null
$EVAL eval.decoders=all eval.num_prompts=${N:-8} eval.batch_size=1 hydra.run.dir=$O/gpu_b1
$EVAL eval.decoders=all eval.num_prompts=16 eval.batch_size=8 hydra.run.dir=$O/gpu_b8
python3 experiments/bench_ar.py device=cuda num_prompts=8 batch_size=1 out=$O/gpu_ar_vs_generate_b1.json
for t in "8 4 3" "16 4 4" "32 6 4" "48 8 4"; do set -- $t
  $EVAL 'eval.decoders=[ar,hawk]' eval.num_prompts=${N:-8} eval.batch_size=1 decoder.tree.budget=$1 \
    decoder.tree.max_depth=$2 decoder.tree.max_rank=$3 hydra.run.dir=$O/gpu_tree_$1_$2_$3
done
