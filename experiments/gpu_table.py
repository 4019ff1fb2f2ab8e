"""Render the GPU lease's measurements (``experiments/gpu_bench.sh``) as one markdown page.

Reads the unpacked output folder (``graphs_seed*/results.json``, ``eager/results.json``, ``verify_cost_*.json``,
``ar_vs_generate*.json``, ``device.txt``) and writes ``<out>``: per decoder the step compression, the seconds per
image and speedup of every graph-captured run and of the eager run, the cost of one step beside AR's and beside
one tree forward (graph-captured, from the verify-cost curve), and the 7B-shaped verify-cost curve with its
projection. Every figure is read from those files.

    python experiments/gpu_table.py experiments/results/gpu_h100 out=experiments/results/bench_gpu_h100_graphs.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify_cost import curve_table, interpolate  # noqa: E402  (the same curve, rendered and read the same way)
from hawkspec.metrics.sweep import built_of  # noqa: E402


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str]) -> str:
    folder = Path(argv[0])
    out = Path(next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("out=")),
                    folder.parent / f"bench_{folder.name}_graphs.md"))
    runs = sorted(folder.glob("graphs_seed*/results.json"))
    graphs = [json.loads(p.read_text()) for p in runs]
    eager = _load(folder / "eager/results.json")
    tiny, big = _load(folder / "verify_cost_tiny.json"), _load(folder / "verify_cost_7b.json")
    device = (folder / "device.txt").read_text().strip().replace("\n", "; ")
    names = [r["decoder"] for r in graphs[0]["rows"]]
    by = [{r["decoder"]: r for r in g["rows"]} for g in graphs]
    ev = {r["decoder"]: r for r in eager["rows"]} if eager else {}
    g0 = graphs[0]
    lines = [
        "# The tiny default and a 7B-shaped Lumina-mGPT on one GPU: eager vs CUDA graphs",
        "",
        f"Machine: {device}. Rendered by `python experiments/gpu_table.py {' '.join(argv)}` from the files of "
        f"`experiments/gpu_bench.sh` in `{folder}`. Tiny model: {g0['num_prompts']} prompts, batch "
        f"{g0['batch_size']}, sampling {g0['sampling']}, 1 warm-up batch then {g0['repeats']} timed passes, decoders "
        "interleaved, seconds = the median pass. Graphs: every decoding step (AR's too) recorded once as a CUDA graph "
        "and replayed (`eval.cuda_graphs=true`, eager kernels, `eval.compile=none`); one run per seed.",
        "",
        "| decoder | step compression (mean) | " + " | ".join(f"graphs s/image (seed {g['seed']})" for g in graphs)
        + " | graphs speedup per seed | eager s/image | eager speedup | eager efficiency |",
        "|---|---|" + "---|" * len(graphs) + "---|---|---|---|",
    ]
    for n in names:
        comp = statistics.mean(b[n]["step_compression"] for b in by)
        secs = " | ".join(f"{b[n]['seconds_per_image']:.3f}" for b in by)
        sp = ", ".join(f"{b[n]['speedup']:.2f}×" for b in by)
        e = ev.get(n, {})
        eff = f"{e['efficiency']:.2f}" if e.get("efficiency") is not None else "n/a"
        lines.append(f"| {n} | {comp:.2f} | {secs} | {sp} | {e.get('seconds_per_image', float('nan')):.3f} | "
                     f"{e.get('speedup', float('nan')):.2f}× | {eff} |")
    lines += ["", "Reading: replaying a recorded step removes the launch cost that made the eager tiny model "
              "launch-bound (AR alone gets ~10× faster), but it does not remove kernels. AR's recorded step is a few "
              "dozen kernels around its forward; a speculative step adds several hundred small ones (propose, tree "
              "gathers, verify, commit, the KV compaction of every layer), which on a model this small cost more "
              "than the tree forward itself -- so with graphs the decoders lose to AR here, whatever their step "
              "compression. Fusing those kernels is what `eval.compile=step` (the whole step as one torch.compile "
              "graph, recordable too) is for; it was not measured on this lease. At 7B the forward dominates: the "
              "verify-cost curve below is the relevant bound there."]
    if tiny:
        t_ar = tiny["graphs"]["ar_step"]
        lines += ["", "What one graph-captured step costs (seed 0): seconds per image ÷ forwards per image, against AR's "
                  "step and against one graph-captured tree forward of the decoder's node count (verify-cost curve "
                  "below); efficiency = speedup ÷ (step compression × t_AR-forward ÷ t_tree-forward).", "",
                  "| decoder | tree nodes | ms per step | × AR step | tree forward alone (ms) | efficiency |",
                  "|---|---|---|---|---|---|"]
        ar_step = by[0]["ar"]["seconds_per_image"] / by[0]["ar"]["forwards_per_image"]
        for n in names:
            r = by[0][n]
            nodes = built_of(r).get("tree_nodes") or 1
            step = r["seconds_per_image"] / r["forwards_per_image"]
            t_tree = t_ar if n == "ar" else interpolate(tiny["graphs"]["verify"], nodes)
            eff = r["speedup"] / (r["step_compression"] * t_ar / t_tree)
            lines.append(f"| {n} | {nodes} | {step * 1e3:.2f} | {step / ar_step:.2f} | {t_tree * 1e3:.3f} | {eff:.2f} |")
    for name, f in (("AR vs transformers `generate`, eager (static caches)", "ar_vs_generate.json"),
                    ("AR vs transformers `generate`, CUDA graphs (ours: recorded steps; theirs: "
                     "`mode=\"reduce-overhead\"` compile)", "ar_vs_generate_graphs.json")):
        r = _load(folder / f)
        if r:
            s = r["seconds_per_image"]
            lines += ["", f"{name}: ours {s['hawkspec_ar']:.4f} s/image, `generate` {s['transformers_generate']:.4f} → "
                      f"ratio {r['ratio_ours_over_generate']:.3f} (batch {r['batch_size']}, no CFG, median of "
                      f"{len(r['all_runs']['hawkspec_ar'])} interleaved runs)."]
    for cost in (big, tiny):
        if not cost:
            continue
        lines += ["", f"## Verify cost: {cost['backbone']}, {cost['dtype']}, context {cost['context']} body tokens, "
                  f"batch {cost['batch_size']} × {cost['streams']} CFG streams", "", *curve_table(cost)]
        if cost.get("projection"):
            lines += ["", f"Projected with the tiny model's step compressions (seed 0), {cost['mode']} forwards: "
                      "step compression × t_AR-step ÷ t_verify(tree nodes), the bound if everything outside the "
                      "forward were free.", "", "| decoder | tree nodes | step compression | projected speedup |",
                      "|---|---|---|---|"]
            for p in cost["projection"]:
                lines.append(f"| {p['decoder']} | {p['tree_nodes']} | {p['step_compression']:.2f} | "
                             f"{p['projected_speedup']:.2f}× |")
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
