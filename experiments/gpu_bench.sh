#!/usr/bin/env bash
# The benchmarks on a CUDA machine, from a bare checkout (no install): every decoder preset vs AR at batch 1
# and 8, our AR vs transformers' generate, and Medusa/Hawk with the GPU tree (conf/decoder/tree/gpu.yaml).
# Outputs under outputs/gpu_*, and their tables and JSON packed into ${OUT:-outputs}/gpu_results.tgz.
#   PYTHONPATH=src bash experiments/gpu_bench.sh   (needs hydra-core, omegaconf, lightning, transformers)
set -euo pipefail
O=outputs
N=${N:-8}
R=${R:-3}
mkdir -p $O
trap 'tar czf ${OUT:-outputs}/gpu_results.tgz $(find $O -maxdepth 2 -path "$O/gpu_*" \( -name "*.json" -o -name "*.md" -o -name "*.txt" -o -name "grid_*.png" \) )' EXIT
EVAL="python3 -m hawkspec.cli.eval device=cuda logger=none eval.quality.enabled=false eval.repeats=$R"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$O/gpu_device.txt"
$EVAL eval.decoders=all eval.num_prompts=$N eval.batch_size=1 eval.step_accounting=true hydra.run.dir=$O/gpu_b1
for d in medusa hawk hawk_gsd; do
  $EVAL decoder=$d decoder/tree=gpu decoder.name=${d}_gputree "eval.decoders=[ar,${d}_gputree]" \
    eval.num_prompts=$N eval.batch_size=1 hydra.run.dir=$O/gpu_b1_${d}_gputree
done
[ -z "${B8:-}" ] || $EVAL eval.decoders=all eval.num_prompts=16 eval.batch_size=8 hydra.run.dir=$O/gpu_b8
python3 experiments/bench_ar.py device=cuda num_prompts=$N batch_size=1 out=$O/gpu_ar_vs_generate_b1.json
# The verify-cost curve: the tiny model, and a 7B-shaped Lumina-mGPT (random weights, bf16), each projected with
# the step compressions of the batch-1 run above (experiments/verify_cost.py).
python3 experiments/verify_cost.py device=cuda results=$O/gpu_b1/results.json out=$O/gpu_verify_cost_tiny
python3 experiments/verify_cost.py model=chameleon_7b device=cuda dtype=bfloat16 results=$O/gpu_b1/results.json \
  out=$O/gpu_verify_cost_7b
