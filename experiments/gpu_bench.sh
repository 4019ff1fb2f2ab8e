#!/usr/bin/env bash
# The GPU measurements, from a bare checkout (no install): on the embedded tiny model, AR and the main decoders
# eager (with step accounting) and with every step replayed from a CUDA graph (three runs, seeds 0-2, batch 1);
# our AR vs transformers' generate eager and with CUDA graphs; the verify-cost curve of the tiny model and of a
# 7B-shaped Lumina-mGPT (random weights, bf16), eager and graph-captured, each projected with the step
# compressions of the first graph run. Everything lands under $O and is packed into ${OUT:-outputs}/gpu_results.tgz;
# `python experiments/gpu_table.py <unpacked folder>` renders the committed table.
#   PYTHONPATH=src bash experiments/gpu_bench.sh   (needs hydra-core, omegaconf, lightning, transformers>=5.24)
# On a bare machine with no index: put those wheels in .whl/ and run first
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
# Env: N prompts, R timed passes, D decoders, O output folder, EXTRA more eval overrides for the graph runs
# (e.g. EXTRA=eval.compile=step: whole steps compiled, then recorded), SKIP_AR / SKIP_GRAPHS_AR skip the generate checks.
set -uo pipefail
O=${O:-outputs/gpu}
N=${N:-8}
R=${R:-3}
D=${D:-[ar,medusa,hawk,sjd,hawk_jacobi]}
EXTRA=${EXTRA:-}
mkdir -p "$O"
# a bare checkout: the configs are the package hawkspec.conf once installed (setup.py); give Hydra the same here
python3 -c "import hawkspec.conf" 2>/dev/null || { cp -r conf src/hawkspec/conf && touch src/hawkspec/conf/__init__.py; }
trap 'tar czf ${OUT:-outputs}/gpu_results.tgz -C "$(dirname $O)" "$(basename $O)" --exclude="*.pt" --exclude="*.npy" --exclude="*.png" 2>/dev/null' EXIT
EVAL="python3 -m hawkspec.cli.eval device=cuda logger=none eval.quality.enabled=false eval.repeats=$R eval.num_prompts=$N eval.batch_size=1"
step() { echo "== $1 ($(date +%T))"; shift; "$@" 2>&1 | grep -v -i warn | tail -25 || echo "FAILED: $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$O/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$O/device.txt"
for s in 0 1 2; do
  step "graphs seed $s" $EVAL "eval.decoders=$D" eval.cuda_graphs=true $EXTRA seed=$s hydra.run.dir=$O/graphs_seed$s
done
step "verify cost 7B" python3 experiments/verify_cost.py model=chameleon_7b device=cuda dtype=bfloat16 graphs=true \
  results=$O/graphs_seed0/results.json out=$O/verify_cost_7b
step "verify cost tiny" python3 experiments/verify_cost.py device=cuda graphs=true results=$O/graphs_seed0/results.json \
  out=$O/verify_cost_tiny
step "eager" $EVAL "eval.decoders=$D" eval.step_accounting=true hydra.run.dir=$O/eager
[ -n "${SKIP_AR:-}" ] || step "AR vs generate, eager" python3 experiments/bench_ar.py device=cuda num_prompts=$N batch_size=1 out=$O/ar_vs_generate.json
[ -n "${SKIP_GRAPHS_AR:-}" ] || step "AR vs generate, CUDA graphs" python3 experiments/bench_ar.py device=cuda cuda_graphs=true \
  num_prompts=$N batch_size=1 out=$O/ar_vs_generate_graphs.json
