#!/usr/bin/env bash
# Regenerate the committed CPU tables and figures under experiments/results/ from the shipped tiny model and heads,
# each step a run of its own, one after another. Run it on a quiet machine: a step that times decoders must be the
# only thing running (nothing else here runs beside it).
#
#   bash experiments/regenerate.sh                        # every step, in order
#   STEPS="grid bench eagle" bash experiments/regenerate.sh   # some of them
#   bash experiments/regenerate.sh --list                 # the steps and what each writes
#
# Resumable: a finished step leaves outputs/regen/<step>/.done and is skipped when rerun (FORCE=1 reruns it; a
# step interrupted halfway starts again from the top, into a fresh folder). Each step appends its wall time to
# outputs/regen/timings.tsv. Tables that report quality run three seeds (mean ± std: experiments/tables.py).
# Needs `make heads` first (its cache, outputs/heads/cache, feeds the VSD-3 heads of `cpu_sweep`).
# The GPU results (bench_gpu_h100*, gpu_h100/) come from experiments/gpu_bench.sh on a CUDA machine instead.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
R=${REGEN_DIR:-outputs/regen}
RES=${RESULTS_DIR:-experiments/results}
HEADS_OUT=${HEADS_OUT:-outputs/heads}
SEEDS=${SEEDS:-0,1,2}
ALL="grid bench eagle hawk_table lantern_sweep gsd_table gsd_window hawk_vs_medusa fig4 vsd_sweep cpu_sweep figures spatial"
STEPS=${STEPS:-$ALL}
export PATH="$BIN:$PATH"

describe() {
  cat <<EOF
grid            tiny_ar_grid.png (hawkspec-generate, default prompts and sampling)
bench           bench_cpu{,_compiled,_step}.{md,json}, ar_vs_generate.md + {,_compiled}.json, projection.{md,json} (make bench N=8)
eagle           eagle_comparison.{md,json,tex} (experiment=eagle_tiny, seeds $SEEDS)
hawk_table      hawk_table1.{md,json,tex} (100 prompts, 1 thread, seeds $SEEDS)
lantern_sweep   lantern_sweep.{md,json,tex} (LANTERN++ lambda 1.25-3 in Medusa, official and exact residual, 100 prompts, 2 threads, seeds $SEEDS)
gsd_table       gsd_table.{md,json,tex} (64 prompts, 1 thread, G = 1, 3, 7, seeds $SEEDS)
gsd_window      gsd_window.{md,json,tex} (64 prompts, batch 8, seeds $SEEDS)
hawk_vs_medusa  hawk_vs_medusa_32.{md,json} (acceptance_sweep, untimed)
fig4            head_accuracy.{md,png} (Hawk heads n=6, VSD 4 on 2,048 self-distilled samples)
vsd_sweep       vsd_sweep.{md,json} (acceptance_sweep on fig4's heads, untimed)
cpu_sweep       hawk_cpu_sweep.{md,json} (Hawk heads with VSD 3 on make heads' cache, timed, 3 passes)
figures         attention_offsets.png, heads_by_distance.png, acceptance_maps.png (analysis_figures.py)
spatial         spatial_tiny.{md,json,tex} (experiment=spatial_tiny: ZipAR, PJD, Hawk, spatial Jacobi; 64 prompts, 1 thread, seeds $SEEDS)
EOF
}
if [[ "${1:-}" == "--list" ]]; then describe; exit 0; fi

header() {  # header TITLE COMMAND -> the lines every copied results.md gets on top
  local torch_version
  torch_version=$("$BIN/python" -c 'import torch; print(torch.__version__)')
  printf '# %s\n\nCommand: `%s`. Machine: %s cores (%s), torch %s, nothing else running; %s.\n\n' "$1" "$2" \
    "$(nproc)" "$(uname -m)" "$torch_version" "$(date -u +%Y-%m-%d)"
}

copy_results() {  # copy_results RUN_DIR STEM TITLE COMMAND: results.{md,json} -> $RES/STEM.{md,json}
  { header "$3" "$4"; cat "$1/results.md"; } > "$RES/$2.md"
  cp "$1/results.json" "$RES/$2.json"
}

step_grid() {
  hawkspec-generate hydra.run.dir="$1"
  cp "$1/grid.png" "$RES/tiny_ar_grid.png"
}

step_bench() {
  make bench N=8
  copy_results outputs/bench bench_cpu "Every decoder against AR, eager, batch 1, step accounting" "make bench N=8"
  copy_results outputs/bench_compiled bench_cpu_compiled "Main decoders against AR, forwards compiled (eval.compile=forward)" "make bench N=8"
  copy_results outputs/bench_step bench_cpu_step "Main decoders against AR, whole steps compiled (eval.compile=step)" "make bench N=8"
  cp outputs/bench/ar_vs_generate.json outputs/bench/ar_vs_generate_compiled.json "$RES/"
  python - "$RES" "$(header "Our AR loop vs transformers' \`generate\` (no CFG, batch 1, 8 prompts, medians)" \
    "python experiments/bench_ar.py num_prompts=8 batch_size=1 compile=none|forward")" <<'PY'
import json, sys
from pathlib import Path
res, head = Path(sys.argv[1]), sys.argv[2]
rows = ["| mode | ours s/image | transformers generate s/image | ours / generate |", "|---|---|---|---|"]
for name, mode in (("ar_vs_generate", "eager (static caches)"), ("ar_vs_generate_compiled", "compiled (static caches)")):
    d = json.loads((res / f"{name}.json").read_text())
    s = d["seconds_per_image"]
    rows.append(f"| {mode} | {s['hawkspec_ar']:.3f} | {s['transformers_generate']:.3f} | {d['ratio_ours_over_generate']:.3f} |")
(res / "ar_vs_generate.md").write_text(head + "\n".join(rows) + "\n")
PY
  cp outputs/bench/projection.md outputs/bench/projection.json "$RES/"
}

step_eagle() {
  hawkspec-eval -m experiment=eagle_tiny seed="$SEEDS" logger=none hydra.sweep.dir="$1/sweep"
  python experiments/tables.py sweep "$1/sweep" --name eagle_comparison --out "$RES" \
    --title "EAGLE vs Medusa vs Hawk heads on the tiny model"
}

step_spatial() {
  hawkspec-eval -m experiment=spatial_tiny seed="$SEEDS" hydra.sweep.dir="$1/sweep"
  python experiments/tables.py spatial "$1/sweep" --out "$RES"
}

step_hawk_table() {
  hawkspec-eval -m 'eval.decoders=[ar,medusa,hawk_vertical_only,medusa_lanternpp,hawk,eagle,hawk_eagle]' \
    eval.quality.fid_features=tiny eval.num_prompts=100 eval.batch_size=1 eval.repeats=1 eval.threads=1 \
    seed="$SEEDS" logger=none hydra.sweep.dir="$1/sweep"
  python experiments/tables.py hawk "$1/sweep" --out "$RES"
}

step_lantern_sweep() {  # LANTERN++'s trade-off: acceptance bought by lambda against alignment and FID lost,
  # with the official residual (zero the draft's k + 1 nearest codes after a rejection with added mass), then ours
  local common=(eval.quality.fid_features=tiny eval.num_prompts=100 eval.batch_size=1 eval.repeats=1 eval.threads=2
                seed="$SEEDS" logger=none)
  hawkspec-eval -m 'eval.decoders=[ar,medusa_lanternpp]' \
    eval.decoders.medusa_lanternpp.acceptance.lam=1.25,1.5,2.0,3.0 "${common[@]}" hydra.sweep.dir="$1/sweep"
  hawkspec-eval -m 'eval.decoders=[ar,medusa_lanternpp]' eval.decoders.medusa_lanternpp.acceptance.residual=exact \
    eval.decoders.medusa_lanternpp.acceptance.lam=1.25,2.0,3.0 eval.quality.noise_floor=false "${common[@]}" hydra.sweep.dir="$1/sweep_exact"
  python experiments/tables.py sweep "$1/sweep" "$1/sweep_exact" --name lantern_sweep --out "$RES" \
    --title "LANTERN++ in Medusa: lambda and the residual after a rejection"
}

step_gsd_table() {
  hawkspec-eval -m 'eval.decoders=[ar,sjd,gsd]' eval.decoders.gsd.acceptance.group=1,3,7 \
    eval.quality.fid_features=tiny eval.num_prompts=64 eval.batch_size=1 eval.repeats=1 eval.threads=1 \
    seed="$SEEDS" logger=none hydra.sweep.dir="$1/sweep"
  python experiments/tables.py gsd "$1/sweep" --out "$RES"
}

step_gsd_window() {
  hawkspec-eval -m 'eval.decoders=[ar,sjd,gsd,gsd_window]' eval.quality.fid_features=tiny eval.num_prompts=64 \
    eval.batch_size=8 eval.repeats=1 seed="$SEEDS" logger=none hydra.sweep.dir="$1/sweep"
  python experiments/tables.py sweep "$1/sweep" --name gsd_window --out "$RES" \
    --title "GSD with the fixed window, beside SJD and filtered GSD"
}

step_hawk_vs_medusa() {
  python experiments/acceptance_sweep.py --prompts 32 --batch-size 8 --variant decoder=medusa --variant decoder=hawk \
    --variant 'decoder=medusa decoder.heads_path=${paths.heads_dir}/hawk' --variant 'decoder=hawk decoder.proposer.order=[[vertical,horizontal]]' \
    --variant 'decoder=hawk decoder.tree.budget=24' --variant 'decoder=medusa decoder.tree.budget=24' \
    --variant decoder=hawk_jacobi --out "$RES/hawk_vs_medusa_32.md"
}

step_fig4() {  # the commands of experiments/head_accuracy.py's docstring
  hawkspec-cache hydra.run.dir="$1/cache" cache.num_samples=2048 cache.val_samples=256
  hawkspec-train hydra.run.dir="$1/train_hawk" shards_dir="$1/cache/shards" heads.num_horizontal=6 heads.vsd=4 \
    trainer.max_epochs=8 export_dir="$1/heads"
  python experiments/head_accuracy.py "$1/heads" --out "$RES"
}

step_vsd_sweep() {
  local heads="$R/fig4/heads" args=() budget
  [[ -f "$R/fig4/.done" ]] || { echo "vsd_sweep needs the fig4 step's heads ($heads): STEPS=fig4 first" >&2; return 1; }
  for budget in "decoder.tree.budget=8" "decoder.tree.budget=16 decoder.tree.max_rank=4" "decoder/tree=gpu"; do
    args+=(--variant "decoder=medusa decoder.heads_path=$heads $budget")   # Hawk heads, vertical off
    for vsd in 1 2 3 4; do args+=(--variant "decoder=hawk decoder.heads_path=$heads $budget decoder.proposer.sources.vertical.vsd=$vsd"); done
  done
  python experiments/acceptance_sweep.py --prompts 16 "${args[@]}" \
    --out "$RES/vsd_sweep.md"
}

step_cpu_sweep() {  # Medusa = the shipped heads; Hawk = the same recipe with VSD 3 (VSD 1-3 set at decoding)
  local shards="$HEADS_OUT/cache/shards"
  [[ -d "$shards" ]] || { echo "cpu_sweep needs make heads' cache ($shards): run make heads first" >&2; return 1; }
  hawkspec-train hydra.run.dir="$1/train_hawk_vsd3" shards_dir="$shards" heads=hawk heads.vsd=3 \
    trainer.max_epochs=5 export_dir="$1/heads/hawk"
  cp -r src/hawkspec/assets/heads/medusa "$1/heads/medusa"
  python experiments/acceptance_sweep.py --timed 3 --batch-size 1 --prompts 8 --threads 2 \
    --common paths.heads_dir="$1/heads" --out "$RES/hawk_cpu_sweep.md" --variant decoder=medusa \
    --variant 'decoder=medusa decoder.heads_path=${paths.heads_dir}/hawk' --variant 'decoder=hawk decoder.proposer.sources.vertical.vsd=1' \
    --variant 'decoder=hawk decoder.proposer.sources.vertical.vsd=2' --variant 'decoder=hawk decoder.proposer.sources.vertical.vsd=3' \
    --variant 'decoder=hawk decoder.tree.budget=4' --variant 'decoder=hawk decoder.tree.budget=16' \
    --variant decoder=sjd --variant decoder=gsd \
    --variant 'decoder=hawk_jacobi decoder.tree.budget=6 decoder.tree.max_depth=6' --variant decoder=hawk_jacobi \
    --variant 'decoder=hawk_jacobi decoder.tree.budget=16 decoder.tree.max_depth=16' --variant decoder=hawk_jacobi_gsd
}

step_figures() {
  python experiments/analysis_figures.py --out "$RES"
}

for step in $STEPS; do  # every name checked before the first (hours-long) step starts
  declare -F "step_$step" >/dev/null || { echo "unknown step '$step'; the steps are:" >&2; describe >&2; exit 2; }
done
mkdir -p "$R" "$RES"
for step in $STEPS; do
  dir="$R/$step"
  if [[ -f "$dir/.done" && -z "${FORCE:-}" ]]; then echo "== $step: done before ($dir/.done), skipped"; continue; fi
  rm -rf "$dir" && mkdir -p "$dir"
  echo "== $step ($(date -u +%H:%M:%S))"
  start=$(date +%s)
  "step_$step" "$dir"
  printf '%s\t%s\t%s\n' "$step" "$(( $(date +%s) - start ))" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$R/timings.tsv"
  touch "$dir/.done"
done
